"""The built-in scene encoder (spaCy), its scoring against the gold set, and ``agent scene``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.eval.scene import TARGETS, load_gold, score_encoder
from hyperlex.scene.encoders import DefaultEncoder, affect_lexicon
from hyperlex.scene.model import KINDS, Delta

GOLD = Path(__file__).parent / "data" / "scene_gold.jsonl"
NEGATION = re.compile(r"\b(not|never|no|nobody|nothing|none|neither|nor)\b|n't", re.I)


@pytest.fixture(scope="module")
def encoder() -> DefaultEncoder:
    return DefaultEncoder()


def triples(delta: Delta) -> set[tuple[str, str, str, int]]:
    labels = {h.id: h.label for h in delta.hyperlexemes}
    return {(labels[k.src], k.rel, labels[k.dst], k.polarity) for k in delta.links}


def hyperlexeme(delta: Delta, label: str):
    return next(h for h in delta.hyperlexemes if h.label == label)


# cheap import --------------------------------------------------------------------------------


def test_importing_the_encoder_and_its_plugin_does_not_load_spacy() -> None:
    code = ("import sys, hyperlex.scene.encoders, hyperlex.plugins.builtin_encoders, "
            "hyperlex.cli.scene;"
            "assert 'spacy' not in sys.modules, 'spacy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_plugin_registers_the_default_encoder() -> None:
    from hyperlex.host import Host

    host = Host()
    assert isinstance(host.scene_encoders["default"], DefaultEncoder)
    assert host.plugins["encoders"].builtin
    assert host.plugins["encoders"].hooks == ["register_scene_encoders"]


# links ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("The cat did not chase the mouse.", {("cat", "chase", "mouse", -1)}),
    ("The cat didn't chase the mouse.", {("cat", "chase", "mouse", -1)}),
    ("The cat never chases the mouse.", {("cat", "chase", "mouse", -1)}),
    ("No cat chases the mouse.", {("cat", "chase", "mouse", -1)}),
    ("The garden has no flowers.", {("garden", "have", "flower", -1)}),
    ("Nobody understands the proof.", {("anyone", "understand", "proof", -1)}),
    ("The child knows nothing.", {("child", "know", "anything", -1)}),
    ("Neither the sun nor the moon remembers the sea.",
     {("sun", "remember", "sea", -1), ("moon", "remember", "sea", -1)}),
    ("The cat chased the mouse.", {("cat", "chase", "mouse", 1)}),
])
def test_negation_gives_polarity_minus_one(encoder: DefaultEncoder, text: str,
                                           expected: set) -> None:
    assert triples(encoder(text)) == expected


def test_double_negation_cancels(encoder: DefaultEncoder) -> None:
    assert triples(encoder("Nobody does not love the sea.")) == {("anyone", "love", "sea", 1)}


def test_negation_stays_in_its_clause(encoder: DefaultEncoder) -> None:
    # the relative clause is not negated by the main clause's "not"
    delta = encoder("The book which I read was not boring.")
    assert triples(delta) == {("speaker", "read", "book", 1), ("book", "be", "boring", -1)}


def test_passive_is_turned_active(encoder: DefaultEncoder) -> None:
    assert triples(encoder("The mouse was chased by the cat.")) == {("cat", "chase", "mouse", 1)}
    assert triples(encoder("The boy was not bitten by the dog.")) == {("dog", "bite", "boy", -1)}
    assert triples(encoder("The students read a poem written by Rumi.")) == {
        ("student", "read", "poem", 1), ("rumi", "write", "poem", 1)}


def test_coordination_gives_one_link_per_conjunct(encoder: DefaultEncoder) -> None:
    assert triples(encoder("Cats and dogs love the sea and the moon.")) == {
        ("cat", "love", "sea", 1), ("dog", "love", "sea", 1),
        ("cat", "love", "moon", 1), ("dog", "love", "moon", 1)}


def test_copula_and_prepositions(encoder: DefaultEncoder) -> None:
    assert triples(encoder("The moon is a mirror.")) == {("moon", "be", "mirror", 1)}
    assert triples(encoder("The cat is not in the house.")) == {("cat", "be in", "house", -1)}
    assert triples(encoder("The cat sits on the mat.")) == {("cat", "sit on", "mat", 1)}
    assert triples(encoder("There is no truth in this proof.")) == {
        ("truth", "be in", "proof", -1)}
    delta = encoder("The sea is calm.")
    assert triples(delta) == {("sea", "be", "calm", 1)}
    assert hyperlexeme(delta, "calm").kind == "quality"


def test_noun_links_control_verbs_and_datives(encoder: DefaultEncoder) -> None:
    assert triples(encoder("The light of the moon falls on the water.")) == {
        ("light", "of", "moon", 1), ("light", "fall on", "water", 1)}
    assert triples(encoder("The teacher does not want to explain the proof.")) == {
        ("teacher", "want to explain", "proof", -1)}
    assert triples(encoder("Mary gave John a book.")) == {
        ("mary", "give", "book", 1), ("mary", "give to", "john", 1)}


def test_pronouns(encoder: DefaultEncoder) -> None:
    assert triples(encoder("I don't love you.")) == {("speaker", "love", "listener", -1)}
    assert triples(encoder("Anna met the sailor, and she loved him.")) == {
        ("anna", "meet", "sailor", 1), ("anna", "love", "sailor", 1)}
    assert triples(encoder("The sailor loves the sea. He does not fear it.")) == {
        ("sailor", "love", "sea", 1), ("sailor", "fear", "sea", -1)}
    unresolved = encoder("She never told him the truth.")
    assert [h.label for h in unresolved.hyperlexemes] == ["truth"] and not unresolved.links
    assert triples(encoder("Do not forget the sea.")) == {("listener", "forget", "sea", -1)}


# hyperlexemes ---------------------------------------------------------------------------------


def test_labels_are_lemmas_compounds_and_names(encoder: DefaultEncoder) -> None:
    delta = encoder("The children ate ice creams in New York with the Pacific Ocean in view.")
    labels = [h.label for h in delta.hyperlexemes]
    assert {"child", "ice cream", "new york", "pacific ocean"} <= set(labels)
    assert "children" not in labels and "ice" not in labels and "york" not in labels
    assert hyperlexeme(encoder("Einstein changed physics."), "physics").kind == "concept"


def test_kinds(encoder: DefaultEncoder) -> None:
    delta = encoder("Socrates loved the truth and the happiness of his old dog.")
    kinds = {h.label: h.kind for h in delta.hyperlexemes}
    assert kinds == {"socrates": "entity", "truth": "concept", "happiness": "concept",
                     "dog": "entity"}


def test_attributes(encoder: DefaultEncoder) -> None:
    delta = encoder("The old grey sailor loves three cats and my heart.")
    assert hyperlexeme(delta, "sailor").attrs == {"quality": "old grey"}
    assert hyperlexeme(delta, "cat").attrs == {"count": 3}
    assert hyperlexeme(delta, "heart").attrs == {"owner": "speaker"}
    assert hyperlexeme(encoder("The moon does not sleep."), "moon").attrs == {
        "acts": "not sleep"}


def test_ids_are_local_ordered_and_consistent_on_the_whole_gold_set(
        encoder: DefaultEncoder) -> None:
    for item in load_gold(GOLD):
        delta = encoder(item["text"])
        ids = [h.id for h in delta.hyperlexemes]
        assert ids == [f"h{i}" for i in range(1, len(ids) + 1)], item["text"]
        assert len({h.label for h in delta.hyperlexemes}) == len(ids), item["text"]
        assert all(h.kind in KINDS for h in delta.hyperlexemes)
        assert all(k.src in ids and k.dst in ids for k in delta.links), item["text"]
        assert Delta.from_dict(json.loads(delta.to_json())).to_dict() == delta.to_dict()


def test_same_label_is_one_hyperlexeme(encoder: DefaultEncoder) -> None:
    delta = encoder("The cat saw a cat. The cats slept.")
    assert [h.label for h in delta.hyperlexemes] == ["cat"]


def test_pipe_matches_single_calls(encoder: DefaultEncoder) -> None:
    texts = ["The cat did not chase the mouse.", "", "What is truth?", "I am happy!"]
    assert [d.to_dict() for d in encoder.pipe(texts)] == [encoder(t).to_dict() for t in texts]


# field ----------------------------------------------------------------------------------------


def test_field_valence_follows_affect_words_and_negation(encoder: DefaultEncoder) -> None:
    happy = encoder("What a wonderful day! I love the bright sun and I am so happy.").field
    sad = encoder("I am sad and lonely; my grief is heavy and the night is dark.").field
    not_happy = encoder("I am not happy.").field
    assert happy is not None and sad is not None and not_happy is not None
    assert happy.valence > 0.3 and happy.emotion == "joyful"
    assert sad.valence < -0.3 and sad.emotion == "melancholic"
    assert encoder("I hate this! I am furious and afraid!").field.emotion == "agitated"
    assert not_happy.valence < 0
    assert -1 <= happy.valence <= 1 and 0 <= happy.arousal <= 1


def test_field_rhythm_and_tone(encoder: DefaultEncoder) -> None:
    assert encoder("Is time a river?").field.tone == "question"
    assert encoder("Look at the stars!").field.tone == "exclamatory"
    assert encoder("Close the door.").field.tone == "imperative"
    assert encoder("The sea is calm.").field.tone == "neutral"
    short = encoder("Waves. Rocks. Wind.").field
    long = encoder("The long grey waves of the northern sea roll slowly, endlessly, against "
                   "the patient rocks of the old harbour, where nobody has waited for years, "
                   "and the wind, tired of its own voice, forgets the names of the ships.").field
    assert (short.tempo, short.line_length) == ("fast", "short")
    assert (long.tempo, long.line_length) == ("slow", "long")
    poem = encoder("The moon is low\nthe sea is slow\nand I am home").field
    assert poem.line_length == "short"


def test_field_is_none_only_without_words(encoder: DefaultEncoder) -> None:
    assert encoder("").field is None and encoder("  \n ").field is None
    assert encoder("").hyperlexemes == [] and encoder("...").field is None
    neutral = encoder("The cat sits on the mat.").field
    assert neutral is not None and neutral.emotion == "neutral" and neutral.valence == 0


def test_affect_lexicon_is_well_formed() -> None:
    lexicon = affect_lexicon()
    assert len(lexicon) >= 300
    assert lexicon["joy"][0] > 0.5 and lexicon["grief"][0] < -0.5
    assert all(-1 <= v <= 1 and 0 <= a <= 1 for v, a in lexicon.values())


# the gold set and its scores ------------------------------------------------------------------


def test_gold_set_is_large_and_negation_rich() -> None:
    gold = load_gold(GOLD)
    assert len(gold) >= 48
    assert sum(bool(NEGATION.search(item["text"])) for item in gold) >= 20
    assert sum(link["polarity"] == -1 for item in gold for link in item["links"]) >= 20


def test_default_encoder_meets_the_targets_on_the_gold_set(encoder: DefaultEncoder) -> None:
    report = score_encoder(encoder, GOLD)
    assert report["hyperlexemes"]["f1"] >= TARGETS["hyperlexeme_f1"], report["errors"][:5]
    assert report["links"]["f1"] >= TARGETS["link_f1"], report["errors"][:5]
    assert report["polarity"]["accuracy"] >= TARGETS["polarity_accuracy"], report["errors"][:5]
    assert all(report["met"].values())


def test_scorer_on_perfect_and_empty_encoders(tmp_path: Path) -> None:
    from hyperlex.scene.model import Hyperlexeme, Link

    gold = load_gold(GOLD)
    by_text = {item["text"]: item for item in gold}

    def perfect(text: str) -> Delta:
        item = by_text[text]
        ids = {h["label"]: f"h{i}" for i, h in enumerate(item["hyperlexemes"], 1)}
        return Delta(
            hyperlexemes=[Hyperlexeme(ids[h["label"]], h["label"], h["kind"])
                          for h in item["hyperlexemes"]],
            links=[Link(ids[k["src"]], k["rel"], ids[k["dst"]], k["polarity"])
                   for k in item["links"]])

    report = score_encoder(perfect, GOLD)
    assert report["hyperlexemes"]["f1"] == report["links"]["f1"] == 1.0
    assert report["polarity"]["accuracy"] == report["kinds"]["accuracy"] == 1.0
    assert report["errors"] == []
    empty = score_encoder(lambda text: Delta(), GOLD)
    assert empty["hyperlexemes"]["recall"] == empty["links"]["recall"] == 0.0
    assert not any(empty["met"].values()) or empty["polarity"]["total"] == 0
    flipped = score_encoder(
        lambda text: Delta(hyperlexemes=perfect(text).hyperlexemes,
                           links=[Link(k.src, k.rel, k.dst, -k.polarity)
                                  for k in perfect(text).links]), GOLD)
    assert flipped["links"]["f1"] == 1.0 and flipped["polarity"]["accuracy"] == 0.0


def test_bad_gold_lines_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "gold.jsonl"
    bad.write_text('{"text": "ok", "hyperlexemes": [], "links": []}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"gold.jsonl:2"):
        load_gold(bad)
    bad.write_text('{"text": "x", "hyperlexemes": [{"label": "cat"}], '
                   '"links": [{"src": "cat", "rel": "chase", "dst": "mouse"}]}\n')
    with pytest.raises(ValueError, match="mouse"):
        load_gold(bad)


# the CLI --------------------------------------------------------------------------------------


def test_scene_encode_json_is_the_delta(runner: CliRunner) -> None:
    from hyperlex.cli.scene import scene

    result = runner.invoke(scene, ["encode", "--json", "The cat did not chase the old mouse."])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"hyperlexemes", "links", "field"}
    for h in data["hyperlexemes"]:
        assert set(h) == {"id", "label", "kind", "attrs"}
    for link in data["links"]:
        assert set(link) == {"src", "rel", "dst", "polarity"}
    assert data == DefaultEncoder()("The cat did not chase the old mouse.").to_dict()
    assert {"valence", "arousal", "emotion", "tempo", "line_length", "tone"} <= set(data["field"])


def test_scene_encode_reads_stdin_and_prints_a_summary(runner: CliRunner) -> None:
    from hyperlex.cli.scene import scene

    result = runner.invoke(scene, ["encode", "-"], input="No cat chases the mouse.\n")
    assert result.exit_code == 0, result.output
    assert "cat NOT chase mouse" in result.stdout
    assert "h1 cat (entity)" in result.stdout and "field: emotion=" in result.stdout


def test_unknown_encoder_is_a_usage_error_listing_known_ones(runner: CliRunner) -> None:
    from hyperlex.cli.scene import scene

    for args in (["encode", "--encoder", "nope", "text"], ["eval", "--encoder", "nope",
                                                           "--gold", str(GOLD)]):
        result = runner.invoke(scene, args)
        assert result.exit_code == 2
        assert "unknown scene encoder 'nope'" in result.stderr and "default" in result.stderr
        assert result.stdout == ""


def test_scene_eval_prints_scores(runner: CliRunner, tmp_path: Path) -> None:
    from hyperlex.cli.scene import scene

    result = runner.invoke(scene, ["eval", "--gold", str(GOLD), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sentences"] >= 48 and all(report["met"].values())
    result = runner.invoke(scene, ["eval", "--gold", str(GOLD), "--verbose", "--worst", "2"])
    assert result.exit_code == 0
    assert "hyperlexemes  P" in result.stdout and "link_f1: met" in result.stdout
    missing = runner.invoke(scene, ["eval", "--gold", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_loading_the_pipeline_leaves_torch_importable() -> None:
    """spaCy is imported without thinc's optional torch import (1.3 s); torch itself must
    still import normally afterwards."""
    import subprocess
    import sys

    code = ("import sys; from hyperlex.scene.encoders import load_pipeline; load_pipeline();"
            "assert 'torch' not in sys.modules; import torch; print(torch.tensor([1]).sum())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # another thread importing torch while the pipeline loads is not affected
    concurrent = ("import threading; from hyperlex.scene.encoders import load_pipeline;"
                  "t = threading.Thread(target=load_pipeline); t.start();"
                  "import torch; t.join(); print(torch.tensor([2]).sum())")
    done = subprocess.run([sys.executable, "-c", concurrent], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
