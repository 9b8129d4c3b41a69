"""docs/architecture.md's module table stays complete and true: every module of core/ has a
row, and every row names a module that exists. Reads files only (no imports)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"
DOC = ROOT / "docs" / "architecture.md"
HEADER = re.compile(r"^\|\s*module\s*\|\s*job\s*\|\s*$")
ROW = re.compile(r"^\|\s*`(hyperlex(?:\.\w+)*)`\s*\|")


def only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8"), str(path)).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
               and isinstance(node.value.value, str) for node in body)


def core_modules() -> set[str]:
    """Every module under core/ as a dotted ``hyperlex`` name; a package's ``__init__`` counts
    as the package, unless it holds only a docstring."""
    names = set()
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE).with_suffix("").parts
        if parts[-1] == "__init__":
            if only_a_docstring(path):
                continue
            parts = parts[:-1]
        names.add(".".join(("hyperlex", *parts)))
    return names


def table_modules() -> list[str]:
    """The first cell of each row of the table headed ``| module | job |``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if HEADER.match(line)]
    assert len(starts) == 1, "docs/architecture.md needs exactly one '| module | job |' table"
    rows = []
    for line in lines[starts[0] + 2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        match = ROW.match(line)
        assert match, f"a row of the module table does not start with a `hyperlex...` name: {line}"
        rows.append(match.group(1))
    return rows


def test_the_module_table_lists_every_module_once_and_nothing_else() -> None:
    rows = table_modules()
    duplicates = sorted({name for name in rows if rows.count(name) > 1})
    assert not duplicates, f"listed twice in docs/architecture.md: {duplicates}"
    modules = core_modules()
    missing = sorted(modules - set(rows))
    assert not missing, f"modules missing from docs/architecture.md's module table: {missing}"
    unknown = sorted(set(rows) - modules)
    assert not unknown, ("docs/architecture.md's module table names no module of core/ (or a "
                         f"package whose __init__ is only a docstring): {unknown}")
