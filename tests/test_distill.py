"""`agent data distill` against an OpenAI-compatible server the test starts on loopback, and
with the local base as teacher; plus the batched engine path the local teacher uses."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.generation import GenerationParams
from hyperlex.training.data import read_dataset

from .conftest import bundles_plugin, install_plugin


class Teacher(BaseHTTPRequestHandler):
    requests: list[dict] = []
    fail_with: int | None = None

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Teacher.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                 **body})
        if Teacher.fail_with:
            self.send_response(Teacher.fail_with)
            self.end_headers()
            self.wfile.write(b'{"error": "no"}')
            return
        question = body["messages"][-1]["content"]
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": f"Teacher says: {question[::-1]}"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def teacher_url():
    Teacher.requests, Teacher.fail_with = [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


@pytest.fixture
def persona_plugin(plugin_site: Path, tiny_bundles: dict[str, Path],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(plugin_site, "hyperlex-tiny", "hx_tiny", bundles_plugin(tiny_bundles["alpha"]))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-tiny")


def distill(*args: str):
    return CliRunner().invoke(cli, ["data", "distill", "-p", "alpha", *args])


def test_distill_from_an_openai_compatible_server_dedups_and_resumes(
        tmp_path: Path, teacher_url: str, persona_plugin: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is time?\nwhat   is TIME?\n# a comment\nWho are you?\n")
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("TEACHER_KEY", "sekret")
    args = ["--prompts", str(prompts), "--out", str(out), "--teacher-url", teacher_url,
            "--teacher-model", "big-teacher", "--api-key-env", "TEACHER_KEY",
            "--batch-size", "2", "-o", "max_new_tokens", "50"]
    result = distill(*args)
    assert result.exit_code == 0, result.output
    records = read_dataset(out)
    assert [(r.human, r.text) for r in records] == [
        ("What is time?", "Teacher says: ?emit si tahW"),
        ("Who are you?", "Teacher says: ?uoy era ohW")]
    first = Teacher.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["model"] == "big-teacher"
    assert first["auth"] == "Bearer sekret" and first["max_tokens"] == 50
    assert first["messages"][0]["role"] == "system"
    assert first["messages"][0]["content"].startswith("You are The Alpha.")

    prompts.write_text(prompts.read_text() + "And space?\n")
    again = distill(*args)
    assert again.exit_code == 0
    assert "1 new records (2 prompts already done" in again.stderr
    assert len(read_dataset(out)) == 3 and len(Teacher.requests) == 3


def test_teacher_errors_are_clear_and_keep_what_was_written(tmp_path: Path, teacher_url: str,
                                                            persona_plugin: None) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"human": "zero", "text": "kept"}) + "\n")
    Teacher.fail_with = 401
    result = distill("--prompts", str(prompts), "--out", str(out), "--teacher-url", teacher_url)
    assert result.exit_code == 1
    assert "answered HTTP 401" in result.stderr and "Traceback" not in result.output
    assert [r.text for r in read_dataset(out)] == ["kept"]


def test_distill_with_the_local_base_as_teacher(tmp_path: Path, tiny_base: Path,
                                                persona_plugin: None) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"human": "What is time?"}) + "\n"
                       + json.dumps({"prompt": "Sing"}) + "\n")
    out = tmp_path / "out.jsonl"
    result = distill("--prompts", str(prompts), "--out", str(out), "--base", str(tiny_base),
                     "-o", "max_new_tokens", "5", "-o", "temperature", "0")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["human"] for r in lines] == ["What is time?", "Sing"][:len(lines)]
    assert all(r["meta"]["teacher"] == "local:tiny-llama" for r in lines)


def test_generate_batch_matches_one_at_a_time(tiny_base: Path,
                                             tiny_bundles: dict[str, Path]) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.persona.bundle import Persona

    engine = TorchEngine([Persona.from_dir(p) for p in tiny_bundles.values()],
                         base=str(tiny_base))
    params = GenerationParams(temperature=0, max_new_tokens=8)
    requests = [([{"role": "user", "content": "What is time?"}], "alpha"),
                ([{"role": "user", "content": "A poem about the sea and the moon"}], "beta"),
                ([{"role": "user", "content": "hi"}], None)]
    batched = engine.generate_batch(requests, params)
    single = [engine.generate(messages, persona, params) for messages, persona in requests]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.usage.prompt_tokens for c in batched] == [c.usage.prompt_tokens for c in single]
