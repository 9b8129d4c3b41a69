"""The scene-reader's pieces on the tiny model: its reading format, its training records,
and the encoder, whose every reply is held to the reading's grammar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperlex.agent.reader import READ_SCHEMA, ReaderEncoder, delta_from_reading, reading
from hyperlex.persona.bundle import Persona
from hyperlex.scene.model import Delta, Hyperlexeme, Link
from hyperlex.structured import GrammarState, ResponseFormat

from .conftest import bundles_plugin, install_plugin, write_bundle

SAILOR = Delta(
    hyperlexemes=[Hyperlexeme("h1", "sailor", "entity", {"quality": "old"}),
                  Hyperlexeme("h2", "lighthouse", "entity", {"count": 2}),
                  Hyperlexeme("h3", "calm", "quality")],
    links=[Link("h1", "see", "h2", -1), Link("h2", "be", "h3")])


def test_a_reading_names_things_by_label_and_reads_back_to_the_delta() -> None:
    text = reading(SAILOR)
    data = json.loads(text)
    assert data["links"][0] == {"src": "sailor", "rel": "see", "dst": "lighthouse",
                                "polarity": -1}
    ResponseFormat.json_schema(READ_SCHEMA).parse(text)
    back = delta_from_reading(data)
    assert back.to_dict() == SAILOR.to_dict()


def test_what_the_schema_cannot_hold_is_not_a_reading() -> None:
    assert reading(Delta()) is None
    odd = Delta(hyperlexemes=[Hyperlexeme("h1", "sea", "entity", {"depth": "great"})])
    assert reading(odd) is None


def test_links_to_things_not_read_are_dropped_and_labels_and_links_merged() -> None:
    delta = delta_from_reading({"hyperlexemes": [
        {"label": "Sea", "kind": "entity", "attrs": {}},
        {"label": "sea", "kind": "concept", "attrs": {}}],
        "links": [{"src": "sea", "rel": "hold", "dst": "ship", "polarity": 1},
                  {"src": "sea", "rel": "be", "dst": "Sea", "polarity": 1},
                  {"src": "sea", "rel": "be", "dst": "sea", "polarity": 1}]})
    assert [h.label for h in delta.hyperlexemes] == ["sea"]
    assert [(k.src, k.rel, k.dst) for k in delta.links] == [("h1", "be", "h1")]


def test_every_training_target_is_a_reading_the_grammar_allows(tiny_base: Path) -> None:
    """The reader is trained on what its grammar will let it write, key order included."""
    import llguidance.hf
    from transformers import AutoTokenizer

    from hyperlex.training.synth import reading_records, voice_reading_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    grammar_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
    fmt = ResponseFormat.json_schema(READ_SCHEMA)
    records = list(reading_records(4))
    records += voice_reading_records(["The old sailor does not see the two lighthouses."], 1)
    assert len(records) == 5 and records[-1]["meta"] == {"source": "voice"}
    for record in records:
        state = GrammarState(grammar_tokenizer, fmt)
        for token in tokenizer(record["text"], add_special_tokens=False)["input_ids"]:
            assert state.allowed()[token], (record["text"], tokenizer.decode([token]))
            state.consume(token)
        assert state.allowed()[tokenizer.eos_token_id]  # the reading is complete


def test_the_encoder_always_returns_a_delta_held_to_the_grammar(tiny_base: Path,
                                                               tmp_path: Path) -> None:
    from hyperlex.engines.torch.engine import TorchEngine

    bundle = write_bundle(tmp_path, "reader", adapter_seed=5, tiny_base=tiny_base)
    engine = TorchEngine([Persona.from_dir(bundle)], base=str(tiny_base), progress=False)
    encoder = ReaderEncoder(bundle, engine=engine)
    texts = ["The sea is calm.", "No ship sails tonight.", "I love the stars."]
    deltas = encoder.read(texts)
    assert len(deltas) == 3
    for delta in deltas:
        assert isinstance(delta, Delta)
        ids = {h.id for h in delta.hyperlexemes}
        assert all(k.src in ids and k.dst in ids for k in delta.links)
    assert encoder("The sea is calm.").to_dict() == deltas[0].to_dict()


def test_an_encoder_whose_bundle_cannot_load_says_why(tmp_path: Path) -> None:
    from hyperlex.errors import HyperlexError

    with pytest.raises(HyperlexError, match="missing: not a directory"):
        ReaderEncoder(tmp_path / "missing")("The sea is calm.")


def test_a_persona_s_sentences_are_read_half_negated_where_there_are_enough() -> None:
    from hyperlex.scene.encoders import DefaultEncoder
    from hyperlex.training.synth import voice_reading_records

    negated = [f"The {n} does not see the lighthouse." for n in ("sailor", "child", "dog")]
    affirmed = [f"The {n} sees the lighthouse." for n in ("sailor", "child", "dog", "cat")]
    sentences = [s for pair in zip(affirmed, negated + [""], strict=True) for s in pair if s]
    encoder = DefaultEncoder()

    def is_negated(record: dict) -> bool:
        return any(k["polarity"] == -1 for k in json.loads(record["text"])["links"])

    four = voice_reading_records(sentences + sentences[:2], 4, seed=3, encoder=encoder)
    assert sum(map(is_negated, four)) == 2 and len({r["human"] for r in four}) == 4
    assert [r["human"] for r in four] == [s for s in sentences if s in {r["human"] for r in four}]
    assert all(r["meta"] == {"source": "voice"} for r in four)
    six = voice_reading_records(affirmed[:3] + negated, 6, seed=3, encoder=encoder)
    assert sum(map(is_negated, six)) == 3  # too few affirmed ones: the rest are negated


def test_agent_data_read_reads_a_bundle_s_chat_but_not_its_held_out_data(
        runner, plugin_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperlex.cli import cli

    bundle = write_bundle(tmp_path / "bundles", "sailor", adapter_seed=None)
    (bundle / "data").mkdir()
    lines = {"train.jsonl": {"human": "The old sailor does not see the lighthouse.",
                             "text": "The sea is calm tonight.\nThe gulls follow the boat."},
             "hindsight-negated.jsonl": {"human": "Tell me.",
                                         "text": "The keeper does not light the lamp."},
             "heldout.jsonl": {"human": "Tell me.", "text": "The moon pulls the tide."},
             "hindsight.jsonl": {"speak_scene": True, "text": "The fisher mends the net.",
                                 "scene": {"hyperlexemes": [{"id": "net", "label": "net"}]}}}
    for name, record in lines.items():
        (bundle / "data" / name).write_text(json.dumps(record) + "\n")
    install_plugin(plugin_site, "hyperlex-sailor", "hx_sailor", bundles_plugin(bundle))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-sailor")
    out = tmp_path / "read.jsonl"

    result = runner.invoke(cli, ["data", "read", "-p", "sailor", "--count", "0", "--voice",
                                 "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    read = {json.loads(line)["human"] for line in out.read_text().splitlines()}
    assert read == {"The old sailor does not see the lighthouse.", "The sea is calm tonight.",
                    "The gulls follow the boat.", "The keeper does not light the lamp."}
    unknown = runner.invoke(cli, ["data", "read", "-p", "nobody", "--out", str(out)])
    assert unknown.exit_code != 0 and "nobody" in unknown.output
