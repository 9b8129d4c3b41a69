"""``agent persona new``: the scaffolded package is valid, installable, found through its
entry point, and its own checks pass; bad names and existing directories are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.persona.bundle import Persona


def pip_install(package: Path, target: Path) -> None:
    """Install ``package`` (built as a wheel, no dependencies) into ``target``, a directory
    put on PYTHONPATH: the test environment itself is left as it was."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(package)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def with_path(target: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYPERLEX_LOAD_PLUGINS"}
    return {**env, "PYTHONPATH": str(target), **extra}


def test_new_persona_package_is_valid_installable_and_found(runner: CliRunner,
                                                            tmp_path: Path) -> None:
    result = runner.invoke(cli, ["persona", "new", "sea-captain", "--dir", str(tmp_path),
                                 "--description", 'Speaks like an "old" sea captain: ahoy.'])
    assert result.exit_code == 0, result.output
    root = tmp_path / "hyperlex-persona-sea-captain"
    assert result.stdout.strip() == str(root) and "agent train" in result.stderr
    bundle = root / "src" / "hyperlex_persona_sea_captain" / "bundle"
    persona = Persona.from_dir(bundle)
    assert (persona.name, persona.scene_encoder, persona.adapter_dir) == \
        ("sea-captain", "sea-captain-scene", None)
    assert persona.description == 'Speaks like an "old" sea captain: ahoy.'
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                          capture_output=True, text=True, cwd=root)
    assert lint.returncode == 0, lint.stdout

    site = tmp_path / "site"
    pip_install(root, site)
    assert (site / "hyperlex_persona_sea_captain" / "bundle" / "data" / "train.jsonl").is_file()
    agent = str(Path(sys.executable).with_name("agent"))
    listed = subprocess.run([agent, "personas", "--json"], capture_output=True, text=True,
                            env=with_path(site))
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["sea-captain"]["plugin"] == "sea-captain"
    checks = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests"),
         "-k", "not answers"], capture_output=True, text=True, cwd=root, env=with_path(site))
    assert checks.returncode == 0, checks.stdout + checks.stderr


@pytest.mark.parametrize(("name", "message"), [
    ("Bad Name", "invalid persona name 'Bad Name'"),
    ("1st", "invalid persona name '1st'"),
    ("auto", "invalid persona name 'auto': it is reserved"),
])
def test_invalid_names_are_refused(runner: CliRunner, tmp_path: Path, name: str,
                                   message: str) -> None:
    result = runner.invoke(cli, ["persona", "new", name, "--dir", str(tmp_path)])
    assert result.exit_code == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_never_touched(runner: CliRunner, tmp_path: Path) -> None:
    existing = tmp_path / "hyperlex-persona-stoic"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    result = runner.invoke(cli, ["persona", "new", "stoic", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]
