"""Dataset format and validation, the synthetic corpus, and `agent data validate` / `synth`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.training.data import DataError, read_dataset
from hyperlex.training.synth import REGISTERS, scene_records, split_of, synth_records
from hyperlex.training.vocabulary import load_vocabulary


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


def test_the_corpus_vocabulary_has_thousands_of_lemmas() -> None:
    vocabulary = load_vocabulary()
    assert sum(len(words) for words in vocabulary.values()) >= 4000
    assert len(vocabulary["nouns"]) >= 2000 and len(vocabulary["verbs"]) >= 150
    assert len(set(vocabulary["nouns"]) & set(vocabulary["verbs"])) == 0


def test_every_synthetic_text_reads_back_to_its_scene() -> None:
    """The default encoder reads each reference back to the scene it is stored with: every
    thing, quality, count and link with its polarity, and the associations are named."""
    from hyperlex.eval.roundtrip import read_back, score_roundtrip
    from hyperlex.scene.encoders import DefaultEncoder

    encoder = DefaultEncoder()
    items = list(scene_records(45, "train", seed=7))
    for item in items:
        scene = item["scene"]
        score = score_roundtrip(scene, read_back(encoder(item["reference"])), item["reference"])
        assert score.hyperlexemes["recall"] == 1.0 and score.links["f1"] == 1.0, item
        assert score.failures == 0, (item["reference"], score.as_dict())
        assert 2 <= len(scene.hyperlexemes) <= 8 and 1 <= len(scene.links) <= 5
    assert {item["register"] for item in items} == set(REGISTERS)
    assert sum(item["negated"] for item in items) >= len(items) / 3
    assert sum(any(h.associations for h in item["scene"].hyperlexemes.values())
               for item in items) >= len(items) / 3
    labels = {h.label for item in items for h in item["scene"].hyperlexemes.values()}
    assert len(labels) >= 150  # not a dozen templates


def test_no_training_scene_is_a_held_out_one() -> None:
    train = list(scene_records(40, "train", seed=1))
    heldout = list(scene_records(10, "heldout", seed=1))
    assert {split_of(item["scene"]) for item in train} == {"train"}
    assert {split_of(item["scene"]) for item in heldout} == {"heldout"}
    keys = [frozenset(h.label for h in item["scene"].hyperlexemes.values())
            for item in train + heldout]
    assert not set(keys[:40]) & set(keys[40:])


def test_the_shipped_held_out_scenes() -> None:
    from hyperlex.eval.roundtrip import load_scenes

    scenes = load_scenes(["heldout"], shipped=False)
    assert len(scenes) >= 48 and all(s.reference for s in scenes)
    assert sum(any(k.polarity < 0 for k in s.scene.links) for s in scenes) >= len(scenes) / 3
    assert {split_of(s.scene) for s in scenes} == {"heldout"}


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


def test_agent_data_synth_writes_evaluation_scenes(tmp_path: Path) -> None:
    from hyperlex.eval.roundtrip import load_scenes

    out = tmp_path / "scenes.jsonl"
    result = CliRunner().invoke(cli, ["data", "synth", "--out", str(out), "--scenes",
                                      "--split", "heldout", "--count", "5",
                                      "--register", "story"])
    assert result.exit_code == 0, result.output
    scenes = load_scenes([out], shipped=False)
    assert len(scenes) == 5 and all(s.id.startswith("heldout-") for s in scenes)


def test_a_plain_record_is_text_alone_and_nothing_else(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "replay.jsonl", [
        json.dumps({"plain": "The river begins in the mountains."}),
        json.dumps({"plain": "Text.", "human": "a question"}),
        json.dumps({"plain": "  "}),
    ])
    with pytest.raises(DataError) as info:
        read_dataset(path)
    assert [p.split(":", 2)[1:] for p in info.value.problems] == [
        ["2", " a plain record has only plain (and meta), not human"],
        ["3", " plain is empty"]]
    path.write_text(json.dumps({"plain": "The river begins in the mountains."}) + "\n")
    [example] = read_dataset(path)
    assert example.plain and example.text == "The river begins in the mountains."
    assert example.as_record() == {"plain": "The river begins in the mountains."}
