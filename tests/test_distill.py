"""`agent data distill` against an OpenAI-compatible server the test starts on loopback, and
with the local base as teacher; plus the batched engine path the local teacher uses."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.errors import HyperlexError
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


def _self_replay(tmp_path: Path, tiny_base: Path, alpha_bundle: Path, prompts: str,
                 *options: str) -> tuple[list[dict], Any, Any]:
    """``agent data distill -p alpha --self`` on ``prompts`` (one per line): its records,
    and an engine holding alpha's adapter with the alpha persona, to compare against."""
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.persona.bundle import Persona

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(prompts)
    out = tmp_path / "out.jsonl"
    result = distill("--prompts", str(prompts_file), "--out", str(out), "--base",
                     str(tiny_base), "--self", *options)
    assert result.exit_code == 0, result.output
    alpha = Persona.from_dir(alpha_bundle)
    return ([json.loads(line) for line in out.read_text().splitlines()],
            TorchEngine([alpha], base=str(tiny_base)), alpha)


def test_self_replay_answers_with_the_persona_s_own_adapter(tmp_path: Path, tiny_base: Path,
                                                           tiny_bundles: dict[str, Path],
                                                           persona_plugin: None) -> None:
    from hyperlex.persona.prompt import build_prompt

    records, engine, alpha = _self_replay(tmp_path, tiny_base, tiny_bundles["alpha"],
                                          "What is time?\nSing\n", "-o", "max_new_tokens",
                                          "6", "-o", "temperature", "0")
    assert {r["meta"]["teacher"] for r in records} == {"self:alpha@local:tiny-llama"}
    params = GenerationParams(temperature=0, max_new_tokens=6)
    answers = {(p, who): engine.generate(build_prompt(alpha, p), who, params).text.strip()
               for p in ("What is time?", "Sing") for who in ("alpha", None)}
    for record in records:
        assert record["text"] == answers[record["human"], "alpha"]
    assert any(answers[p, "alpha"] != answers[p, None] for p in ("What is time?", "Sing"))


def test_distill_asks_for_one_source_of_prompts_and_a_local_self(
        tmp_path: Path, persona_plugin: None, teacher_url: str) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    out = str(tmp_path / "out.jsonl")
    for args, says in ((("--out", out), "exactly one of --prompts FILE and --fresh-prompts N"),
                       (("--prompts", str(prompts), "--fresh-prompts", "3", "--out", out),
                        "exactly one of"),
                       (("--prompts", str(prompts), "--out", out, "--self", "--teacher-url",
                         teacher_url), "takes no --teacher-url")):
        result = distill(*args)
        assert result.exit_code == 2 and says in result.output, result.output
    assert not Teacher.requests and not Path(out).exists()


def _bundle_with_data(root: Path, name: str, train: list[str], heldout: list[str],
                      tiny_base: Path | None = None) -> Path:
    from .conftest import write_bundle

    bundle = write_bundle(root, name, adapter_seed=1 if tiny_base else None,
                          tiny_base=tiny_base)
    (bundle / "data").mkdir()
    for file, prompts in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (bundle / "data" / file).write_text("".join(
            json.dumps({"human": p, "text": f"{name} answers {p}"}) + "\n" for p in prompts))
    return bundle


def test_fresh_prompts_are_others_training_prompts_never_own_or_held_out(tmp_path: Path) -> None:
    from hyperlex.persona.bundle import Persona
    from hyperlex.training.distill import fresh_prompts

    own = Persona.from_dir(_bundle_with_data(tmp_path, "own", ["What is time?"], ["Why?"]))
    (own.root / "data" / "hindsight-chat.jsonl").write_text(
        json.dumps({"human": "The sea is calm.", "text": "So it is."}) + "\n"
        + json.dumps({"plain": "A replay text."}) + "\n")
    other = Persona.from_dir(_bundle_with_data(
        tmp_path, "other", ["what is  TIME?", "Sing", "Why?", "The sea is calm.", "Count",
                            "Dance", "sing"], ["Count"]))
    third = Persona.from_dir(_bundle_with_data(tmp_path, "third", ["Dance", "Rest"], ["Sleep"]))
    personas = [own, other, third]
    drawn = fresh_prompts(own, personas, 10, seed=0)
    assert sorted(drawn) == ["Dance", "Rest", "Sing"]
    assert fresh_prompts(own, personas, 2, seed=3) == fresh_prompts(own, personas, 2, seed=3)
    assert len(fresh_prompts(own, personas, 2, seed=3)) == 2
    with pytest.raises(HyperlexError, match="no fresh prompts for 'third'"):
        fresh_prompts(third, [third], 4)


def test_self_replay_samples_the_adapter_at_temperature_one_whatever_the_contract_says(
        tmp_path: Path, tiny_base: Path, tiny_bundles: dict[str, Path],
        persona_plugin: None) -> None:
    """The tiny contract decodes greedily; self-replay samples (temperature 1, top-p 0.95, no
    repetition penalty), seeded by -o seed."""
    from hyperlex.persona.prompt import build_prompt

    records, engine, alpha = _self_replay(tmp_path, tiny_base, tiny_bundles["alpha"],
                                          "What is time?\n", "-o", "max_new_tokens", "12",
                                          "-o", "seed", "3")
    conversation = build_prompt(alpha, "What is time?")
    sampled = engine.generate_batch([(conversation, "alpha")], GenerationParams(
        temperature=1.0, top_p=0.95, max_new_tokens=12, seed=3))[0].text.strip()
    greedy = engine.generate(conversation, "alpha", alpha.contract.params().updated(
        {"max_new_tokens": 12})).text.strip()
    assert sampled != greedy
    assert [r["text"] for r in records] == [sampled]


def test_self_replay_on_fresh_prompts_resumes_into_the_bundle(
        tmp_path: Path, tiny_base: Path, plugin_site: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Written into the persona's own data/, a rerun draws the same fresh prompts (the file
    it writes does not count as trained on) and asks none of them again. (The built-in cast
    is installed too, so its prompts are fresh for alpha as well.)"""
    own = _bundle_with_data(tmp_path, "alpha", ["What is time?"], ["Why?"], tiny_base)
    other = _bundle_with_data(tmp_path, "other", ["Sing", "Dance", "Rest", "Why?"], ["Count"])
    install_plugin(plugin_site, "hyperlex-tiny", "hx_tiny", bundles_plugin(own, other))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-tiny")
    out = own / "data" / "self-replay.jsonl"
    args = ("--fresh-prompts", "2", "--seed", "1", "--self", "--out", str(out), "--base",
            str(tiny_base), "-o", "max_new_tokens", "4")
    first = distill(*args)
    assert first.exit_code == 0, first.output
    written = [r.human for r in read_dataset(out)]
    assert len(written) == 2 and not set(written) & {"What is time?", "Why?", "Count"}
    again = distill(*args)
    assert again.exit_code == 0, again.output
    assert "0 new records (2 prompts already done" in again.stderr
    assert [r.human for r in read_dataset(out)] == written
