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


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_implemented_by_a_test(hook: str) -> None:
    pattern = re.compile(rf"def {hook}\(")
    users = [path.name for path in (ROOT / "tests").glob("*.py")
             if path.name != Path(__file__).name and pattern.search(path.read_text())]
    assert users, f"no test implements the hook {hook}"
