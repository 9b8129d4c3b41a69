"""Every hook in the plugin contract is documented in docs/hooks.md and implemented by some
test plugin: adding a hookspec without both fails here, naming the hook."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from hyperlex import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name, value in vars(hookspecs).items()
               if inspect.isfunction(value) and hasattr(value, "hyperlex_spec"))


def test_the_contract_has_hooks() -> None:
    assert {"register_personas", "register_scene_encoders", "on_turn"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_arguments_and_an_example(hook: str) -> None:
    docs = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
    arguments = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    heading = f"### `{hook}({arguments})`"
    assert heading in docs, f"docs/hooks.md has no section {heading}"
    section = docs.split(heading, 1)[1].split("\n### ", 1)[0]
    assert f"def {hook}(" in section, f"docs/hooks.md: the {hook} section has no example"


def _section(hook: str) -> str:
    docs = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
    arguments = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    return docs.split(f"### `{hook}({arguments})`", 1)[1].split("\n### ", 1)[0]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_fully_annotated(hook: str) -> None:
    signature = inspect.signature(getattr(hookspecs, hook))
    for name, parameter in signature.parameters.items():
        assert parameter.annotation is not inspect.Parameter.empty, f"{hook}({name}) has no type"
    assert signature.return_annotation is not inspect.Signature.empty, f"{hook} has no return type"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_argument_has_a_param_line_in_the_docstring(hook: str) -> None:
    function = getattr(hookspecs, hook)
    doc = inspect.getdoc(function) or ""
    for name in inspect.signature(function).parameters:
        assert re.search(rf"^:param {name}: \S", doc, re.MULTILINE), (
            f"hookspecs.{hook}: no ':param {name}:' line in the docstring")
    assert re.search(r"^:return: \S", doc, re.MULTILINE), (
        f"hookspecs.{hook}: no ':return:' line in the docstring")


@pytest.mark.parametrize("hook", HOOKS)
def test_every_argument_is_documented_with_its_type(hook: str) -> None:
    """Each argument is listed under its hook as ``- `name` (`TYPE`)``, TYPE as annotated in
    hookspecs.py, and the return value as ``Returns `TYPE` ``, so the docs follow the code."""
    section = _section(hook)
    signature = inspect.signature(getattr(hookspecs, hook))
    for name, parameter in signature.parameters.items():
        entry = f"- `{name}` (`{parameter.annotation}`)"
        assert entry in section, f"docs/hooks.md: the {hook} section has no line {entry!r}"
    returns = f"Returns `{signature.return_annotation}`"
    assert returns in section, f"docs/hooks.md: the {hook} section does not say {returns!r}"


def test_an_argument_name_has_one_type() -> None:
    """``scene``, ``personas``, ``current``... mean one thing wherever they appear (up to
    ``| None``); only ``register`` is a different callback per hook."""
    types: dict[str, set[str]] = {}
    for hook in HOOKS:
        for name, parameter in inspect.signature(getattr(hookspecs, hook)).parameters.items():
            types.setdefault(name, set()).add(str(parameter.annotation).removesuffix(" | None"))
    del types["register"]
    assert {name: kinds for name, kinds in types.items() if len(kinds) > 1} == {}


def test_route_turn_is_not_a_pluggy_firstresult_hook() -> None:
    """The host asks each implementation itself (tests/test_host.py); the spec must not claim
    that pluggy does."""
    assert not hookspecs.route_turn.hyperlex_spec.get("firstresult")


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_implemented_by_a_test(hook: str) -> None:
    pattern = re.compile(rf"def {hook}\(")
    users = [path.name for path in (ROOT / "tests").glob("*.py")
             if path.name != Path(__file__).name and pattern.search(path.read_text())]
    assert users, f"no test implements the hook {hook}"
