"""The layout's promises that import-linter cannot check: the front door, no private names
crossing modules, and examples and scaffolded packages that need nothing but ``hyperlex``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_TREES = ("core", "plugins", "tests", "bench", "examples")
# private names of other projects that their own APIs ask subclasses and tests to use
FOREIGN_PRIVATE = {"_identifying_params", "_get_llm_string", "_get_ls_params", "_exit",
                   "_forward_hooks", "_asdict", "_replace", "_fields"}


def python_files(*trees: str) -> list[Path]:
    return sorted(p for tree in trees for p in (ROOT / tree).rglob("*.py")
                  if ".venv" not in p.parts)


def test_no_module_imports_a_private_name_from_another() -> None:
    found = []
    for path in python_files(*PYTHON_TREES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hyperlex"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                          for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_tests_bench_and_examples_use_only_public_attributes() -> None:
    found = []
    for path in python_files("tests", "bench", "examples"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in FOREIGN_PRIVATE
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls"))):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not found, "private attributes used from outside their module:\n" + "\n".join(found)


def test_the_front_door_exports_what_a_program_needs_without_torch() -> None:
    code = ("import sys, hyperlex\n"
            "missing = [n for n in hyperlex.__all__ if getattr(hyperlex, n, None) is None]\n"
            "assert not missing, missing\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'llama_cpp') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    import hyperlex

    for name in ("Host", "Controller", "open_engine", "TorchEngine", "LlamaCppEngine",
                 "OpenAIEngine", "Store", "Scene", "Hyperlexeme", "Link", "SceneField",
                 "Delta", "HyperlexError", "UnknownPersona", "build_prompt", "ChatPersona"):
        assert name in hyperlex.__all__, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hyperlex.Nope  # noqa: B018


def front_door_violations(paths: list[Path]) -> list[str]:
    """Imports of ``hyperlex.<anything>`` instead of ``hyperlex`` itself."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path}:{node.lineno}: {name}" for name in names
                      if name.startswith("hyperlex.")]
    return found


def test_examples_import_only_from_the_front_door() -> None:
    assert not front_door_violations(python_files("examples"))


def test_a_scaffolded_persona_package_imports_only_from_the_front_door(tmp_path: Path) -> None:
    from hyperlex.persona.scaffold import create

    root = create("sea-captain", tmp_path, "smollm2-135m-instruct")
    assert not front_door_violations(sorted(root.rglob("*.py")))


def test_engines_are_chosen_by_name() -> None:
    from hyperlex import ENGINES, HyperlexError, open_engine

    assert list(ENGINES) == ["torch", "llamacpp", "openai"]
    with pytest.raises(HyperlexError, match="unknown engine 'vllm'; engines: torch, "):
        open_engine([], engine="vllm")
