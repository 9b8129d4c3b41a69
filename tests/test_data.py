"""Dataset format and validation, the synthetic corpus, and `agent data validate` / `synth`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.training.data import DataError, read_dataset
from hyperlex.training.synth import EMOTIONS, RHYTHMS, TEMPLATES, synth_records


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_both_record_forms_are_read_with_history_scene_and_field(tmp_path: Path) -> None:
    scene = {"hyperlexemes": [{"id": "h1", "label": "sea", "kind": "entity"}], "focus": ["h1"]}
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"human": "hi", "text": "hello"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"},
                                 {"role": "assistant", "content": "d"}],
                    "field": {"emotion": "joy", "valence": 0.8}}),
        json.dumps({"human": "describe", "text": "the sea", "scene": scene}),
    ])
    first, chat, scened = read_dataset(path)
    assert (first.human, first.text, first.line) == ("hi", "hello", 1)
    assert (chat.human, chat.text, chat.line) == ("c", "d", 3)
    assert chat.history == [{"role": "user", "content": "a"},
                            {"role": "assistant", "content": "b"}]
    assert chat.scene.field.emotion == "joy"
    assert scened.scene.hyperlexemes["h1"].label == "sea"


def test_every_bad_record_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [
        json.dumps({"human": "fine", "text": "fine"}),
        '{"human": "unterminated',
        json.dumps({"human": "no reply"}),
        json.dumps({"human": "x", "text": "   "}),
        json.dumps({"human": "x", "text": "y", "mood": "sad"}),
        json.dumps({"messages": [{"role": "system", "content": "s"},
                                 {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "u"},
                                 {"role": "user", "content": "again"}]}),
        json.dumps({"human": "x", "text": "y", "field": {"color": "red"}}),
        json.dumps({"human": "x", "text": "y", "field": {"valence": "high"}}),
        json.dumps({"human": "x", "text": "y", "scene": {"hyperlexemes": [{"id": "h1"}]}}),
        json.dumps(["not", "an", "object"]),
    ])
    with pytest.raises(DataError) as info:
        read_dataset(path)
    problems = info.value.problems
    assert [p.split(":")[1] for p in problems] == [str(n) for n in range(2, 12)]
    for expected in ("invalid JSON", "text is missing", "text is empty", "unknown field(s) mood",
                     "no system message", "expected role 'assistant'", "field:",
                     "field.valence must be a number",
                     "scene is not a valid scene", "must be a JSON object"):
        assert any(expected in p for p in problems), expected


def test_agent_data_validate_lists_problems_and_fails(tmp_path: Path) -> None:
    good = write_lines(tmp_path / "good.jsonl", [json.dumps({"human": "a", "text": "b"})])
    bad = write_lines(tmp_path / "bad.jsonl", ["{", json.dumps({"human": "a"})])
    runner = CliRunner()
    ok = runner.invoke(cli, ["data", "validate", str(good)])
    assert ok.exit_code == 0 and ok.stdout == f"{good}: 1 records OK\n"
    failed = runner.invoke(cli, ["data", "validate", str(good), str(bad)])
    assert failed.exit_code == 1
    assert f"{bad}:1: invalid JSON" in failed.stdout
    assert f"{bad}:2: text is missing" in failed.stdout


def test_synthetic_corpus_crosses_templates_with_fields_and_keeps_negation() -> None:
    records = synth_records(direction="output")
    assert len(records) == len(TEMPLATES) * len(EMOTIONS) * len(RHYTHMS)
    harbor = next(r for r in records if r["meta"]["template"] == "harbor"
                  and r["field"]["emotion"] == "fear" and r["field"]["tempo"] == "fast")
    assert "does not fear the storm" in harbor["text"]
    assert any(link["polarity"] == -1 for link in harbor["scene"]["links"])
    assert {r["field"]["tempo"] for r in records} == {"fast", "moderate", "slow"}


def test_input_records_target_the_scene_delta() -> None:
    [record] = synth_records(count=1, direction="input", seed=3)
    delta = json.loads(record["text"])
    labels = {h["label"] for h in delta["hyperlexemes"]}
    assert all(label in record["human"] for label in labels)
    assert {"src", "rel", "dst", "polarity"} == set(delta["links"][0])


def test_agent_data_synth_writes_a_valid_dataset(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    result = CliRunner().invoke(cli, ["data", "synth", "--out", str(out), "--direction", "both",
                                      "--count", "20"])
    assert result.exit_code == 0, result.output
    assert len(read_dataset(out)) == 40
