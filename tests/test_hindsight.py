"""Hindsight scene records: windows of a persona's own replies, each with the scene the
default encoder reads in it, read back to exactly that scene (`agent data hindsight`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperlex.eval.roundtrip import read_back, score_roundtrip
from hyperlex.scene.encoders import DefaultEncoder, load_pipeline
from hyperlex.scene.model import USER, Scene
from hyperlex.training.data import parse_record
from hyperlex.training.hindsight import (
    content_scene,
    hindsight_records,
    negate_verb,
    negated_windows,
    sentence_spans,
    statement,
    windows,
)

from .conftest import bundles_plugin, install_plugin, write_bundle

REPLIES = [
    (1, "The old sailor does not see the lighthouse. The sea is calm tonight, and the gulls "
        "sleep on the mast. Nothing else moves."),
    (2, "Gratitude is rain on a dusty road:\nit settles the dust and lightens the load.\n"
        "I'll keep a candle burning in this room."),
    (3, "Yes."),
]


@pytest.fixture(scope="module")
def encoder() -> DefaultEncoder:
    return DefaultEncoder()


def test_sentences_and_verse_lines_are_split_without_their_breaks() -> None:
    text = "One sentence; another! A line\nand the next line."
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "One sentence;", "another!", "A line", "and the next line."]


def test_every_record_reads_back_to_exactly_its_scene(encoder: DefaultEncoder) -> None:
    records = hindsight_records(REPLIES, encoder)
    assert records, "the replies hold windows worth a record"
    for record in records:
        scene = Scene.from_dict(record["scene"])
        assert 2 <= len(scene.hyperlexemes) <= 8 and scene.links
        score = score_roundtrip(scene, read_back(encoder(record["text"])), record["text"])
        assert score.hyperlexemes["recall"] == 1.0
        assert score.links["recall"] == 1.0 and not score.logical_loss
        parse_record(record)  # a valid speak_scene record


def test_a_negated_link_survives_as_a_negated_link(encoder: DefaultEncoder) -> None:
    first = hindsight_records(REPLIES[:1], encoder)[0]
    assert first["text"].startswith("The old sailor does not see the lighthouse.")
    scene = Scene.from_dict(first["scene"])
    labels = {h.id: h.label for h in scene.hyperlexemes.values()}
    assert ("sailor", "see", "lighthouse", -1) in {
        (labels[k.src], k.rel, labels[k.dst], k.polarity) for k in scene.links}


def test_the_speakers_i_and_you_are_not_part_of_the_scene(encoder: DefaultEncoder) -> None:
    for _, scene in windows(REPLIES[1][1], encoder):
        labels = {h.label for h in scene.hyperlexemes.values()}
        assert not labels & {"speaker", "listener"}
        assert all(k.src in scene.hyperlexemes and k.dst in scene.hyperlexemes
                   for k in scene.links)


def test_a_window_stays_within_the_thing_budget(encoder: DefaultEncoder) -> None:
    for _, scene in windows(REPLIES[0][1], encoder, max_hyperlexemes=3):
        assert len(scene.hyperlexemes) <= 3


def test_count_keeps_negated_windows_first_in_data_order(encoder: DefaultEncoder) -> None:
    every = hindsight_records(REPLIES, encoder)
    [kept] = hindsight_records(REPLIES, encoder, count=1)
    assert kept == every[0] and kept["meta"] == {"hindsight": True, "line": 1}


def test_agent_data_hindsight_writes_each_bundles_records(
        runner, plugin_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperlex.cli import cli

    bundle = write_bundle(tmp_path / "bundles", "sailor", adapter_seed=None)
    (bundle / "data").mkdir()
    (bundle / "data" / "train.jsonl").write_text("".join(
        json.dumps({"human": "Tell me.", "text": text}) + "\n" for _, text in REPLIES))
    mute = write_bundle(tmp_path / "bundles", "mute", adapter_seed=None)
    install_plugin(plugin_site, "hyperlex-sailor", "hx_sailor", bundles_plugin(bundle, mute))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-sailor")

    result = runner.invoke(cli, ["data", "hindsight", "-p", "sailor", "--json"])
    assert result.exit_code == 0, result.output
    [summary] = json.loads(result.stdout)
    written = (bundle / "data" / "hindsight.jsonl").read_text().splitlines()
    assert summary["replies"] == 3 and summary["records"] == len(written) > 0
    assert summary["negated"] == 1

    chat = runner.invoke(cli, ["data", "hindsight", "-p", "sailor", "--chat", "--json"])
    assert chat.exit_code == 0, chat.output
    chat_turns = (bundle / "data" / "hindsight-chat.jsonl").read_text().splitlines()
    assert json.loads(chat.stdout)[0]["records"] == len(chat_turns) > 0
    assert all("human" in json.loads(line) for line in chat_turns)

    negate = runner.invoke(cli, ["data", "hindsight", "-p", "sailor", "--negate", "--json"])
    assert negate.exit_code == 0, negate.output
    counterfactual = (bundle / "data" / "hindsight-negated.jsonl").read_text().splitlines()
    assert json.loads(negate.stdout)[0]["negated"] == len(counterfactual) > 0
    whole = runner.invoke(cli, ["data", "hindsight", "-p", "sailor", "--negate", "--whole-reply",
                                "--json"])
    assert whole.exit_code == 0, whole.output
    replies = [json.loads(line)["text"] for line in
               (bundle / "data" / "hindsight-negated-whole.jsonl").read_text().splitlines()]
    assert 0 < len(replies) == len(set(replies)) and all(" not " in r for r in replies)
    alone = runner.invoke(cli, ["data", "hindsight", "-p", "sailor", "--whole-reply"])
    assert alone.exit_code == 2 and "--whole-reply needs --chat or --negate" in alone.output

    outside = runner.invoke(cli, ["data", "hindsight", "-p", "sailor", "--out", "../x.jsonl"])
    assert outside.exit_code == 2 and "outside the bundle" in outside.output
    no_data = runner.invoke(cli, ["data", "hindsight", "-p", "mute"])
    assert no_data.exit_code == 1 and "'mute' has no training data" in no_data.output


def test_a_window_that_does_not_fit_is_left_out(encoder: DefaultEncoder) -> None:
    every = hindsight_records(REPLIES, encoder)
    kept = hindsight_records(REPLIES, encoder, fits=lambda record: "sailor" not in record["text"])
    assert kept == [r for r in every if "sailor" not in r["text"]] and len(kept) < len(every)


def _triples(scene: Scene) -> set[tuple[str, str, str, int]]:
    labels = {h.id: h.label for h in scene.hyperlexemes.values()}
    return {(labels[k.src], k.rel, labels[k.dst], k.polarity) for k in scene.links}


def test_a_chat_turn_states_the_negated_fact_and_the_reply_keeps_it(
        encoder: DefaultEncoder) -> None:
    first = hindsight_records(REPLIES[:1], encoder, chat=True)[0]
    assert first["human"].startswith("The old sailor does not see the lighthouse.")
    assert first["text"].startswith("The old sailor does not see the lighthouse.")
    assert first["meta"] == {"hindsight": True, "line": 1, "chat_turn": True}
    example = parse_record(first)
    assert example.human == first["human"] and not example.speaks_scene
    assert ("sailor", "see", "lighthouse", -1) in _triples(example.scene)
    assert all(h.said_by == [USER] for h in example.scene.hyperlexemes.values())


def test_every_chat_turn_reply_keeps_what_the_user_stated(encoder: DefaultEncoder) -> None:
    records = hindsight_records(REPLIES, encoder, chat=True)
    assert len(records) >= 2
    for record in records:
        stated = Scene.from_dict(record["scene"])
        assert stated.links and len(stated.links) <= 2
        score = score_roundtrip(stated, read_back(encoder(record["text"])), record["text"])
        assert score.links_relaxed["recall"] == 1.0 and not score.logical_loss
        assert score.negations_kept == score.negations


@pytest.mark.parametrize("text, message", [
    ("The summer is not with the end.", "The summer is not with the end."),
    ("The shell lies around the stone.", "The shell lies around the stone."),
    ("The happy child does not eat the green apple.",
     "The happy child does not eat the green apple."),
    ("No one knows the answer.", "No one knows the answer."),
    ("The clock hangs at the end of the hall.", "The clock hangs at the end."),
])
def test_a_statement_says_each_kind_of_link_in_plain_words(
        encoder: DefaultEncoder, text: str, message: str) -> None:
    said = Scene().apply(encoder(text), turn=0)
    result = statement(said, encoder)
    assert result is not None and result[0] == message
    assert _triples(result[1]) <= _triples(said)


def test_a_scene_without_a_statable_link_has_no_statement(encoder: DefaultEncoder) -> None:
    assert statement(Scene(), encoder) is None


@pytest.mark.parametrize("text, negated", [
    ("The sailor sees the lighthouse.", "The sailor does not see the lighthouse."),
    ("The gulls slept on the mast.", "The gulls did not sleep on the mast."),
    ("The waves carry the boats.", "The waves do not carry the boats."),
    ("The sea is calm.", "The sea is not calm."),
    ("The keeper can light the lamp.", "The keeper can not light the lamp."),
    ("The boat was pulled by the tide.", "The boat was not pulled by the tide."),
    ("The sailor does not see the lighthouse.", None),  # already negated
    ("Can the sailor see the lighthouse?", None),  # a question
])
def test_one_verb_negates_its_clause(text: str, negated: str | None) -> None:
    doc = load_pipeline()(text)
    verbs = [t for t in doc if t.dep_ == "ROOT"]
    assert negate_verb(doc, verbs[0]) == negated


def test_a_counterfactual_window_flips_exactly_one_link(encoder: DefaultEncoder) -> None:
    window = "The sailor sees the lighthouse, and the gulls sleep on the mast."
    scene = content_scene(encoder(window))
    found = {text: reading for text, reading, _ in negated_windows(window, scene, encoder)}
    assert set(found) == {"The sailor does not see the lighthouse, and the gulls sleep on "
                          "the mast.",
                          "The sailor sees the lighthouse, and the gulls do not sleep on "
                          "the mast."}
    before = _triples(scene)
    for reading in found.values():
        after = _triples(reading)
        [lost], [gained] = before - after, after - before
        assert lost[:3] == gained[:3] and (lost[3], gained[3]) == (1, -1)


def test_counterfactual_chat_turns_state_and_keep_the_negated_fact(
        encoder: DefaultEncoder) -> None:
    records = hindsight_records(REPLIES, encoder, negate=True)
    assert records and all(r["meta"]["counterfactual"] for r in records)
    assert records[0]["text"] == ("The old sailor does not see the lighthouse. The sea is not "
                                  "calm tonight, and the gulls sleep on the mast. Nothing "
                                  "else moves.")
    assert records[0]["human"].startswith("The old sailor does not see the lighthouse. The sea "
                                          "is not")
    for record in records:
        stated = Scene.from_dict(record["scene"])
        assert any(link.polarity < 0 for link in stated.links)  # the user states the denial
        score = score_roundtrip(stated, read_back(encoder(record["text"])), record["text"])
        assert score.negations and score.negations_kept == score.negations
        parse_record(record)


def test_a_whole_reply_turn_negates_one_window_inside_the_reply(
        encoder: DefaultEncoder) -> None:
    reply = ("The sailor sees the lighthouse. The keeper lights the lamp. The gulls sleep on "
             "the mast.")
    [record] = hindsight_records([(7, reply)], encoder, max_hyperlexemes=2, negate=True,
                                 whole_reply=True)
    assert record["text"] == ("The sailor does not see the lighthouse. The keeper lights the "
                              "lamp. The gulls sleep on the mast.")
    assert record["meta"] == {"hindsight": True, "line": 7, "chat_turn": True,
                              "counterfactual": True, "whole_reply": True}
    stated = Scene.from_dict(record["scene"])
    score = score_roundtrip(stated, read_back(encoder(record["text"])), record["text"])
    assert score.negations and score.negations_kept == score.negations
    windows_alone = hindsight_records([(7, reply)], encoder, max_hyperlexemes=2, negate=True)
    assert len(windows_alone) > 1
    assert windows_alone[0]["text"] == "The sailor does not see the lighthouse."

    chat = hindsight_records([(7, reply)], encoder, max_hyperlexemes=2, chat=True,
                             whole_reply=True)
    assert [r["text"] for r in chat] == [reply]
    with pytest.raises(ValueError, match="chat-form"):
        hindsight_records([(7, reply)], encoder, whole_reply=True)
