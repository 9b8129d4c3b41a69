"""The plugin host: discovery through entry points, fault isolation and host-owned policy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from hyperlex import hookimpl
from hyperlex.host import Host
from hyperlex.persona.bundle import Persona
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


def speakers(root: Path, *names: str) -> dict[str, Persona]:
    """What a TurnRouter hands the host: the personas that can answer, by name."""
    return {name: Persona.from_dir(write_bundle(root, name, adapter_seed=None)) for name in names}


def test_route_turn_answer_must_name_an_installed_persona(tmp_path: Path) -> None:
    class Confused:
        @hookimpl
        def route_turn(self, message, scene, personas, current):
            return "nobody" if "c" in message else ["not", "a", "name"]

    class Sensible:
        @hookimpl
        def route_turn(self, message, scene, personas, current):
            return "beta" if "b" in message else None

    host = Host(extra_plugins={"confused": Confused(), "sensible": Sensible()},
                entry_points=False)
    personas = speakers(tmp_path, "alpha", "beta")
    # "sensible", registered last, is asked first; its answer means "confused" is not asked.
    assert host.route_turn("b?", Scene(), personas, None) == ("beta", "sensible")
    assert host.plugins["confused"].ok
    assert host.route_turn("a?", Scene(), personas, None) is None
    assert host.route_turn("c?", Scene(), personas, None) is None
    assert host.plugins["confused"].errors == [
        "route_turn chose unknown persona ['not', 'a', 'name']",
        "route_turn chose unknown persona 'nobody'",
    ]


def test_route_turn_first_valid_answer_wins_and_later_plugins_are_not_asked(
        tmp_path: Path) -> None:
    """The host asks the implementations one at a time (pluggy's order: tryfirst, then the
    last registered first, then trylast); one that raises or names an unavailable persona is
    reported and skipped, and the first valid answer ends the search."""
    asked: list[str] = []
    seen: list[Mapping[str, Persona]] = []

    class Raising:
        @hookimpl(tryfirst=True)
        def route_turn(self, message):
            asked.append("raising")
            raise RuntimeError("router broke")

    class Deciding:
        @hookimpl
        def route_turn(self, message, personas):
            asked.append("deciding")
            seen.append(personas)
            return "beta" if "beta" in message else None

    class Abstaining:
        @hookimpl
        def route_turn(self, current):
            asked.append("abstaining")
            return None

    class Unknown:
        @hookimpl
        def route_turn(self, personas):
            asked.append("unknown")
            return "nobody"

    class Late:
        @hookimpl(trylast=True)
        def route_turn(self, scene):
            asked.append("late")
            return "alpha"

    host = Host(extra_plugins={"raising": Raising(), "deciding": Deciding(),
                               "abstaining": Abstaining(), "unknown": Unknown(),
                               "late": Late()}, entry_points=False)
    personas = speakers(tmp_path, "beta", "alpha")

    assert host.route_turn("ask beta", Scene(), personas, "alpha") == ("beta", "deciding")
    assert asked == ["raising", "unknown", "abstaining", "deciding"]  # "late" is not asked
    assert host.plugins["raising"].errors == ["route_turn raised RuntimeError: router broke"]
    assert host.plugins["unknown"].errors == ["route_turn chose unknown persona 'nobody'"]
    assert host.plugins["deciding"].ok and host.plugins["late"].ok

    asked.clear()
    assert host.route_turn("anyone", None, personas, None) == ("alpha", "late")
    assert asked == ["raising", "unknown", "abstaining", "deciding", "late"]

    # ``personas`` is what routers get: name -> Persona, here in name order and read-only.
    [mapping, _] = seen
    assert list(mapping) == ["alpha", "beta"] and mapping["beta"] is personas["beta"]
    with pytest.raises(TypeError):
        mapping["gamma"] = personas["beta"]  # type: ignore[index]


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
