"""The plugin host: discovery through entry points, fault isolation and host-owned policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperlex import hookimpl
from hyperlex.host import Host
from hyperlex.scene.model import Scene

from .conftest import bundles_plugin, install_plugin, write_bundle


def test_builtin_plugin_registers_the_philosopher() -> None:
    host = Host()
    assert host.plugins["personas"].builtin
    assert host.plugins["personas"].hooks == ["register_personas"]
    assert host.plugin_of("philosopher") == "personas"
    assert host.personas["philosopher"].base_model == "smollm2-135m-instruct"


def test_third_party_plugin_is_discovered_through_its_entry_point(
        plugin_site: Path, tiny_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(plugin_site, "hyperlex-alpha", "hx_alpha", bundles_plugin(tiny_bundles["alpha"]))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-alpha")
    host = Host()
    record = host.plugins["hyperlex-alpha"]
    assert (record.distribution, record.version, record.builtin) == ("hyperlex-alpha", "0.1.0",
                                                                     False)
    assert host.plugin_of("alpha") == "hyperlex-alpha"
    assert "philosopher" in host.personas  # built-ins are unaffected


def test_load_plugins_variable_restricts_third_party_plugins(
        plugin_site: Path, tiny_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(plugin_site, "hyperlex-alpha", "hx_alpha", bundles_plugin(tiny_bundles["alpha"]))
    install_plugin(plugin_site, "hyperlex-beta", "hx_beta", bundles_plugin(tiny_bundles["beta"]))
    builtins = {"personas", "encoders", "routers"}
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-beta")
    assert set(Host().plugins) == builtins | {"hyperlex-beta"}
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "")
    assert set(Host().plugins) == builtins
    monkeypatch.delenv("HYPERLEX_LOAD_PLUGINS")
    assert {"hyperlex-alpha", "hyperlex-beta"} <= set(Host().plugins)


def test_plugin_that_fails_to_import_is_reported_and_others_still_work(
        plugin_site: Path, tiny_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(plugin_site, "hyperlex-broken", "hx_broken", "import no_such_module\n")
    install_plugin(plugin_site, "hyperlex-alpha", "hx_alpha", bundles_plugin(tiny_bundles["alpha"]))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-broken,hyperlex-alpha")
    host = Host()
    broken = host.plugins["hyperlex-broken"]
    assert not broken.ok
    assert "ModuleNotFoundError" in broken.errors[0] and "no_such_module" in broken.errors[0]
    assert "alpha" in host.personas and "philosopher" in host.personas


def test_plugin_raising_inside_a_hook_is_reported_and_others_still_work(
        tiny_bundles: dict[str, Path]) -> None:
    class Exploding:
        @hookimpl
        def register_personas(self, register):
            raise RuntimeError("boom")

        @hookimpl
        def on_turn(self, turn, scene):
            raise RuntimeError("observer broke")

    class Good:
        @hookimpl
        def register_personas(self, register):
            register(tiny_bundles["beta"])

    host = Host(extra_plugins={"exploding": Exploding(), "good": Good()})
    assert "beta" in host.personas
    host.on_turn(turn=None, scene=Scene())
    errors = host.plugins["exploding"].errors
    assert errors == ["register_personas raised RuntimeError: boom",
                      "on_turn raised RuntimeError: observer broke"]


def test_bad_bundle_from_a_plugin_is_skipped_with_its_message(
        tmp_path: Path, tiny_bundles: dict[str, Path]) -> None:
    bad = write_bundle(tmp_path, "broken", adapter_seed=None)
    (bad / "persona.yaml").write_text((bad / "persona.yaml").read_text().replace(
        "description: A test persona called broken.\n", ""))

    class Plugin:
        @hookimpl
        def register_personas(self, register):
            register(bad)
            register(tiny_bundles["alpha"])

    host = Host(extra_plugins={"mixed": Plugin()})
    assert "alpha" in host.personas and "broken" not in host.personas
    [problem] = host.problems
    assert "persona from plugin 'mixed' skipped" in problem
    assert "persona.yaml: description: required field is missing" in problem


def test_name_collision_keeps_the_first_and_reports_the_second(
        tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    impostor = write_bundle(tmp_path, "philosopher", adapter_seed=None)

    class Plugin:
        @hookimpl
        def register_personas(self, register):
            register(impostor)

    host = Host(extra_plugins={"impostor": Plugin()})
    assert host.plugin_of("philosopher") == "personas"
    assert host.problems == ["persona 'philosopher' from plugin 'impostor' skipped: already "
                             "registered by plugin 'personas'"]


def test_scene_encoders_and_routers_are_registered_by_name() -> None:
    def encode(text):
        return Scene()

    class Plugin:
        @hookimpl
        def register_scene_encoders(self, register):
            register("nothing", encode)
            register("nothing", encode)

        @hookimpl
        def register_routers(self, register):
            register("always-beta", lambda message, scene, personas: "beta")

    host = Host(extra_plugins={"p": Plugin()}, entry_points=False)
    assert host.scene_encoders == {"nothing": encode}
    assert list(host.routers) == ["always-beta"]
    assert "scene encoder 'nothing' from plugin 'p' skipped" in host.problems[0]


def test_route_turn_answer_must_name_an_installed_persona() -> None:
    class Confused:
        @hookimpl
        def route_turn(self, message, scene, personas, current):
            return "nobody"

    class Sensible:
        @hookimpl
        def route_turn(self, message, scene, personas, current):
            return "beta" if "b" in message else None

    host = Host(extra_plugins={"confused": Confused(), "sensible": Sensible()},
                entry_points=False)
    assert host.route_turn("b?", Scene(), ["alpha", "beta"], None) == ("beta", "sensible")
    assert host.route_turn("a?", Scene(), ["alpha", "beta"], None) is None
    assert "route_turn chose unknown persona 'nobody'" in host.plugins["confused"].errors[0]


def test_plugin_with_an_unknown_hook_is_reported() -> None:
    class Typo:
        @hookimpl
        def register_persona(self, register):  # missing "s"
            pass

    host = Host(extra_plugins={"typo": Typo()}, entry_points=False)
    [error] = host.plugins["typo"].errors
    assert error == "implements unknown hook 'register_persona'; did you mean 'register_personas'?"


def test_hook_wrappers_are_refused_with_a_reason() -> None:
    class Wrapping:
        @hookimpl(wrapper=True)
        def on_turn(self, turn, scene):
            return (yield)

    host = Host(extra_plugins={"wrapping": Wrapping()}, entry_points=False)
    host.on_turn(turn=None, scene=Scene())
    [error] = host.plugins["wrapping"].errors
    assert error.startswith("on_turn: hook wrappers are not supported")
