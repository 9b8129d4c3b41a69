"""The third-party example package examples/hyperlex-persona-stoic, installed with pip: found
through its entry point, listed with its plugin name, answering on the real model, and its
own tests passing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .test_scaffold import pip_install, with_path

pytestmark = pytest.mark.real_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hyperlex-persona-stoic"
AGENT = str(Path(sys.executable).with_name("agent"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("stoic-site")
    pip_install(EXAMPLE, target)
    return target


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stoic-home")


def test_the_installed_package_carries_its_trained_adapter(site: Path) -> None:
    package = site / "hyperlex_persona_stoic"
    assert (package / "bundle" / "adapter" / "adapter_model.safetensors").is_file()
    assert (package / "control.tsv").is_file()


def test_agent_personas_lists_the_stoic_with_its_plugin(site: Path, home: Path) -> None:
    done = subprocess.run([AGENT, "personas", "--json"], capture_output=True, text=True,
                          env=with_path(site, HYPERLEX_HOME=str(home)))
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["stoic"]["plugin"] == "stoic"
    assert rows["stoic"]["adapter_rank"] == 6 and "philosopher" in rows


def test_agent_chat_answers_as_the_stoic(site: Path, home: Path) -> None:
    done = subprocess.run(
        [AGENT, "chat", "--persona", "stoic", "-m", "My train was cancelled and I am furious.",
         "-o", "temperature", "0", "-o", "max_new_tokens", "60", "--no-store", "--json"],
        capture_output=True, text=True, timeout=600, env=with_path(site, HYPERLEX_HOME=str(home)))
    assert done.returncode == 0, done.stderr
    turn = json.loads(done.stdout)
    assert turn["persona"] == "stoic" and len(turn["reply"].split()) > 10


def test_the_packages_own_tests_pass(site: Path, home: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=EXAMPLE, timeout=600,
                          env=with_path(site, HYPERLEX_HOME=str(home)))
    assert done.returncode == 0, done.stdout + done.stderr
