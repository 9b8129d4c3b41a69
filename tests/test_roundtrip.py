"""The round trip scene -> text -> scene (``agent eval roundtrip``): the scoring on hand-made
scenes with known answers, the shipped scene set, the evaluation loop on a fake engine, and
the CLI (roundtrip and all) on the tiny model."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.errors import HyperlexError
from hyperlex.eval.roundtrip import (
    METRICS,
    EvalScene,
    aggregate,
    load_scenes,
    read_back,
    roundtrip,
    score_roundtrip,
    shipped_scenes,
)
from hyperlex.generation import Completion
from hyperlex.persona.bundle import Persona
from hyperlex.persona.prompt import say_scene_message, scene_prompt
from hyperlex.scene.model import Hyperlexeme, Link, Scene, SceneField, slugify

from .conftest import bundles_plugin, install_plugin, write_bundle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make(labels: list[str], links: list[tuple[str, str, str, int]] = (),
         attrs: dict[str, dict] | None = None, assoc: dict[str, list[str]] | None = None
         ) -> Scene:
    """A scene from labels and (src label, rel, dst label, polarity) links."""
    attrs, assoc = attrs or {}, assoc or {}
    hxs = {slugify(label): Hyperlexeme(slugify(label), label, "entity",
                                       dict(attrs.get(label, {})), 1.0,
                                       list(assoc.get(label, [])))
           for label in labels}
    return Scene(hyperlexemes=hxs,
                 links=[Link(slugify(s), r, slugify(d), p) for s, r, d, p in links])


SOURCE = make(["sailor", "lighthouse", "sea", "calm"],
              [("sailor", "see", "lighthouse", -1), ("sea", "be", "calm", 1)],
              attrs={"sailor": {"quality": "old"}}, assoc={"sea": ["salt", "horizon"]})
FAITHFUL_TEXT = ("The old sailor did not see the lighthouse; the calm sea smelled of salt and "
                 "horizon.")


# scoring -------------------------------------------------------------------------------------


def test_a_faithful_reply_keeps_everything() -> None:
    score = score_roundtrip(SOURCE, SOURCE, FAITHFUL_TEXT)
    assert score.hyperlexemes["recall"] == score.hyperlexemes["precision"] == 1.0
    assert score.links["f1"] == score.links_relaxed["f1"] == 1.0
    assert (score.split_links, score.impoverished, score.logical_loss) == ([], [], [])
    assert score.details == 3 and score.matched_links == 2 and score.failures == 0


def test_a_planted_negation_flip_is_logical_loss() -> None:
    lost = make(["sailor", "lighthouse", "sea", "calm"],
                [("sailor", "see", "lighthouse", 1), ("sea", "be", "calm", 1)])
    score = score_roundtrip(SOURCE, lost, FAITHFUL_TEXT)
    assert score.logical_loss == [{"link": "sailor NOT see lighthouse",
                                   "reply_link": "sailor see lighthouse",
                                   "kind": "negation lost", "match": "strict"}]
    assert score.links["f1"] == 1.0 and score.split_links == []  # the link itself survived

    invented = make(["sailor", "lighthouse", "sea", "calm"],
                    [("sailor", "see", "lighthouse", -1), ("sea", "be", "calm", -1)])
    flips = score_roundtrip(SOURCE, invented, FAITHFUL_TEXT).logical_loss
    assert [(f["link"], f["kind"]) for f in flips] == [("sea be calm", "negation invented")]


def test_a_planted_lost_link_is_a_split_link() -> None:
    reply = make(["sailor", "lighthouse", "sea"], [("sea", "wash", "sailor", 1)])
    score = score_roundtrip(SOURCE, reply, "")
    assert score.split_links == [
        {"link": "sailor NOT see lighthouse", "kind": "broken"},  # both ends came back
        {"link": "sea be calm", "kind": "endpoint lost", "lost": ["calm"]},
    ]
    assert score.missing_hyperlexemes == ["calm"]
    assert score.hyperlexemes["recall"] == 0.75 and score.hyperlexemes["precision"] == 1.0
    assert score.links == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1,
                           "fn": 2}
    assert score.logical_loss == []  # a lost link is not a flip


def test_the_relaxed_match_ignores_relation_and_direction() -> None:
    reply = make(["sailor", "lighthouse", "sea", "calm"],
                 [("lighthouse", "elude", "sailor", -1), ("sea", "seem", "calm", -1)])
    score = score_roundtrip(SOURCE, reply, "")
    assert score.links["f1"] == 0.0 and score.links_relaxed["f1"] == 1.0
    assert score.split_links == []
    assert score.logical_loss == [{"link": "sea be calm", "reply_link": "sea NOT seem calm",
                                   "kind": "negation invented", "match": "relaxed"}]


def test_a_second_link_between_the_same_pair_is_split_not_flipped() -> None:
    source = make(["robot", "poem"], [("robot", "read", "poem", 1),
                                      ("robot", "understand", "poem", -1)])
    reply = make(["robot", "poem"], [("robot", "read", "poem", 1)])
    score = score_roundtrip(source, reply, "")
    assert score.split_links == [{"link": "robot NOT understand poem", "kind": "broken"}]
    assert score.logical_loss == [] and score.matched_links == 1


def test_lost_attributes_and_associations_impoverish_the_scene() -> None:
    source = make(["ship", "island"], [("ship", "sail to", "island", 1)],
                  attrs={"ship": {"count": 3, "quality": "old grey"}, "island": {"owner": "king"}},
                  assoc={"ship": ["salt", "horizons"]})
    reply = make(["ship", "island"], [("ship", "sail to", "island", 1)],
                 attrs={"island": {"owner": "king"}})
    score = score_roundtrip(source, reply, "Three old ships sail to the island under the horizon.")
    assert score.details == 6  # count, two quality words, owner, two associations
    assert score.impoverished == [
        {"hyperlexeme": "ship", "attr": "quality", "value": "grey"},
        {"hyperlexeme": "ship", "association": "salt"},
    ]
    assert score.failures == 2


def test_the_speakers_voice_and_source_associations_are_not_inventions() -> None:
    reply = make(["sailor", "lighthouse", "sea", "calm", "speaker", "salt", "dog"],
                 [("sailor", "see", "lighthouse", -1), ("sea", "be", "calm", 1),
                  ("speaker", "love", "sea", 1), ("dog", "bark at", "sea", 1)])
    score = score_roundtrip(SOURCE, reply, FAITHFUL_TEXT)
    assert score.extra_hyperlexemes == ["dog"]
    assert score.hyperlexemes["precision"] == 0.8  # 4 kept, 1 invented
    assert score.links["fp"] == 1  # dog bark at sea; speaker love sea is the voice


def test_aggregate_micro_averages_over_scenes() -> None:
    perfect = score_roundtrip(SOURCE, SOURCE, FAITHFUL_TEXT)
    broken = score_roundtrip(SOURCE, make(["sailor"]), "")
    metrics, counts = aggregate([perfect, broken])
    assert set(metrics) == set(METRICS)
    assert metrics["hyperlexeme_recall"] == round(5 / 8, 4)
    assert metrics["split_links"] == 0.5 and metrics["impoverished"] == 0.5
    assert metrics["logical_loss"] == 0.0
    assert counts["split_links"] == 2 and counts["endpoint_lost"] == 2
    assert counts["scenes"] == 2 and counts["source_links"] == 4


# the default encoder in the loop ----------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    from hyperlex.scene.encoders import DefaultEncoder

    return DefaultEncoder()


def test_a_reply_that_drops_a_negation_is_caught_through_the_encoder(encoder) -> None:
    text = "The old sailor saw the lighthouse, and the sea was calm. Salt and horizon."
    score = score_roundtrip(SOURCE, read_back(encoder(text)), text)
    assert [(f["link"], f["kind"]) for f in score.logical_loss] == [
        ("sailor NOT see lighthouse", "negation lost")]
    text = "The sailor did not see anything."
    score = score_roundtrip(SOURCE, read_back(encoder(text)), text)
    kinds = {e["link"]: e["kind"] for e in score.split_links}
    assert kinds == {"sailor NOT see lighthouse": "endpoint lost", "sea be calm": "endpoint lost"}


def test_the_shipped_references_survive_the_round_trip(encoder) -> None:
    """Each shipped scene's reference description, read back by the default encoder, keeps
    every hyperlexeme, link, polarity and detail: the scenes are reachable by the encoder."""
    for item in shipped_scenes():
        score = score_roundtrip(item.scene, read_back(encoder(item.reference)), item.reference)
        assert score.hyperlexemes["recall"] == 1.0, (item.id, score.missing_hyperlexemes)
        assert score.links["recall"] == 1.0, (item.id, score.split_links)
        assert score.failures == 0, (item.id, score.as_dict())


# scene sets -------------------------------------------------------------------------------


def test_the_shipped_scene_set() -> None:
    scenes = shipped_scenes()
    assert len(scenes) == 24 and len({s.id for s in scenes}) == 24
    negated = 0
    for item in scenes:
        scene = item.scene
        assert 3 <= len(scene.hyperlexemes) <= 6 and 2 <= len(scene.links) <= 4, item.id
        assert scene.field != SceneField() and item.reference
        assert Scene.from_json(scene.to_json()) == scene
        negated += any(link.polarity < 0 for link in scene.links)
    assert negated >= len(scenes) / 3
    assert sum(any(h.associations for h in s.scene.hyperlexemes.values()) for s in scenes) >= 20
    assert sum(any(h.attrs for h in s.scene.hyperlexemes.values()) for s in scenes) >= 16


def scene_line(**changes) -> str:
    record = {"id": "mine", **make(["cat", "mat"], [("cat", "sit on", "mat", 1)]).to_dict()}
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "a scene must be a JSON object"),
    (scene_line(id=""), "'id' must be a non-empty string"),
    (scene_line(colour="red"), "unknown field(s) colour; allowed: id, reference"),
    (scene_line(hyperlexemes=[]), "the scene has no hyperlexemes"),
    (scene_line(links=[{"src": "cat", "rel": "see", "dst": "dog"}]),
     "unknown hyperlexeme id(s) dog"),
    (scene_line(hyperlexemes=[{"id": "cat", "label": "cat", "kind": "animal"}]), "not a scene: "),
    (scene_line(links=[{"src": "cat", "rel": "on", "dst": "mat", "polarity": 0}]),
     "polarity must be 1 or -1"),
    (scene_line(hyperlexemes=[{"id": "a", "label": "Cat"}, {"id": "b", "label": "cat "}]),
     "same label 'cat'"),
    (scene_line(id="cat-mat"), "scene id 'cat-mat' is already used at hyperlex/eval/data/"),
])
def test_a_bad_scene_file_names_the_file_and_line(tmp_path: Path, line: str,
                                                   message: str) -> None:
    path = tmp_path / "scenes.jsonl"
    path.write_text("# my scenes\n\n" + line + "\n")
    with pytest.raises(HyperlexError) as info:
        load_scenes([path])
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_user_scenes_are_added_after_the_shipped_ones(tmp_path: Path) -> None:
    path = tmp_path / "scenes.jsonl"
    path.write_text(scene_line() + "\n" + scene_line(id="other", reference="A cat.") + "\n")
    scenes = load_scenes([path])
    assert [s.id for s in scenes[-2:]] == ["mine", "other"] and len(scenes) == 26
    assert scenes[-1].reference == "A cat." and scenes[-1].where == f"{path}:2"
    assert [s.id for s in load_scenes([path], shipped=False)] == ["mine", "other"]
    with pytest.raises(HyperlexError, match="no scenes"):
        load_scenes([], shipped=False)


def test_the_persona_sees_the_whole_scene_whatever_its_view(tmp_path: Path) -> None:
    persona = Persona.from_mapping({
        "name": "terse", "description": "d", "base_model": "b",
        "contract": {"system": "You are {persona}. Scene: {scene}", "scene_view": "none",
                     "scene_budget": 1}})
    system, user = scene_prompt(persona, SOURCE)
    assert system["role"] == "system" and user["role"] == "user"
    assert SOURCE.render("all") in system["content"]
    assert "sailor NOT see lighthouse" in system["content"]
    assert user["content"] == say_scene_message(SOURCE)
    assert user["content"].endswith("Associations: sea: salt, horizon")
    assert persona.system_message(SOURCE) == "You are Terse. Scene: (empty)"  # untouched


# the evaluation loop ------------------------------------------------------------------------


class ScriptedEngine:
    """generate_batch answers each scene with its reference ("faithful") or with nothing of
    it ("careless")."""

    def __init__(self, scenes: list[EvalScene]):
        self.by_facts = {say_scene_message(s.scene): s for s in scenes}
        self.calls: list[int] = []

    def count_tokens(self, messages):  # the prompt builder budgets the scene with it
        return sum(len(m["content"].split()) for m in messages)

    def generate_batch(self, requests, params=None, layers=()):
        assert params.temperature == 0 and not layers
        self.calls.append(len(requests))
        replies = []
        for messages, persona in requests:
            item = self.by_facts[messages[-1]["content"]]
            text = item.reference if persona == "faithful" else "  Nothing happens.  "
            replies.append(Completion(text, persona, "stop"))
        return replies


def test_roundtrip_scores_every_persona_on_every_scene(encoder) -> None:
    scenes = shipped_scenes()[:3]
    engine = ScriptedEngine(scenes)
    personas = {name: Persona.from_mapping({
        "name": name, "description": "d", "base_model": "b",
        "contract": {"system": "You are {persona}.\nScene: {scene}"}})
        for name in ("faithful", "careless")}
    messages: list[str] = []
    report = roundtrip(engine, personas, scenes, encoder, batch_size=4,
                       progress=messages.append)
    assert engine.calls == [4, 2] and messages[-1] == "reading the replies back"
    assert report.personas == ["careless", "faithful"]
    assert report.scenes == [s.id for s in scenes]
    good, bad = report.metrics["faithful"], report.metrics["careless"]
    assert good["hyperlexeme_recall"] == good["link_f1"] == 1.0
    assert good["split_links"] == good["impoverished"] == good["logical_loss"] == 0.0
    assert bad["hyperlexeme_recall"] == 0.0 and bad["split_links"] == 1.0
    assert bad["impoverished"] == 1.0
    failures = report.failures()
    assert failures and {f["persona"] for f in failures} == {"careless"}
    assert {f["scene"] for f in failures} == {s.id for s in scenes}
    assert {f["reply"] for f in failures} == {"Nothing happens."}
    assert {f["mode"] for f in failures} == {"split link", "impoverished"}
    data = json.loads(json.dumps(report.as_dict()))
    assert data["results"]["faithful"][0]["reply"] == scenes[0].reference
    assert data["results"]["careless"][0]["read_back"]["hyperlexemes"] == ["anything"]
    assert set(data["mean"]) == set(METRICS)
    assert "faithful" in report.table() and "mean" in report.table()


def test_an_encoder_failure_scores_as_an_empty_reading(encoder) -> None:
    scenes = shipped_scenes()[:2]
    persona = Persona.from_mapping({"name": "faithful", "description": "d", "base_model": "b",
                                    "contract": {"system": "{scene}"}})

    def fragile(text: str):
        if text == scenes[0].reference:
            raise RuntimeError("boom")
        return encoder(text)

    report = roundtrip(ScriptedEngine(scenes), {"faithful": persona}, scenes, fragile)
    first, second = report.results["faithful"]
    assert first["error"] == "encoder failed: RuntimeError: boom"
    assert first["score"]["hyperlexemes"]["recall"] == 0.0
    assert "error" not in second and second["score"]["hyperlexemes"]["recall"] == 1.0


# the CLI on the tiny model --------------------------------------------------------------------


def roundtrip_cli(runner: CliRunner, tiny_base: Path, *args: str):
    return runner.invoke(cli, ["eval", "roundtrip", "--base", str(tiny_base), "-p", "alpha",
                               "-p", "beta", "--max-new-tokens", "6", *args])


def test_the_round_trip_generates_the_same_replies_on_llama_cpp_and_torch(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path) -> None:
    """The default engine (llama.cpp's exact mode) gives the torch engine's greedy replies,
    so the faster evaluation measures the same thing."""
    pytest.importorskip("llama_cpp")
    replies = {}
    for engine in ("llamacpp", "torch"):
        result = roundtrip_cli(runner, tiny_base, "--limit", "3", "--json", "--engine", engine)
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        replies[engine] = {name: [r["reply"] for r in data["results"][name]]
                           for name in data["personas"]}
    assert any(reply for per in replies["torch"].values() for reply in per)
    assert replies["llamacpp"] == replies["torch"]


def test_eval_roundtrip_on_the_tiny_model_writes_a_report_and_gates(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate.yaml"
    gate.write_text("roundtrip: {split_links_max: -0.1, logical_loss_max: 1.0}\n"
                    "routing: {implicit: 0.99}\n")  # not run here: ignored
    out = tmp_path / "report"
    result = roundtrip_cli(runner, tiny_base, "--limit", "2", "--json", "--report", str(out),
                           "--thresholds", str(gate))
    assert result.exit_code == 3, result.output
    data = json.loads(result.stdout)
    assert data["personas"] == ["alpha", "beta"] and len(data["scenes"]) == 2
    for name in ("alpha", "beta"):
        assert [r["scene"] for r in data["results"][name]] == data["scenes"]
        assert all(0 <= data["metrics"][name][m] <= 1 for m in METRICS)
    assert "missed their threshold" in result.stderr
    assert "roundtrip.split_links_max: alpha" in result.stderr
    assert "routing" not in result.stderr.split("missed their threshold")[1]

    document = json.loads((out / "report.json").read_text())
    assert document["sections"]["roundtrip"]["personas"] == ["alpha", "beta"]
    assert document["gate"]["passed"] is False and document["base"] == "tiny-llama"
    assert document["command"].startswith("agent eval roundtrip ")
    assert "--limit 2 " in document["command"] and "--thresholds " in document["command"]
    assert f"Command: `{document['command']}`" in (out / "report.md").read_text()
    assert set(document["gate"]["thresholds"]) == {"roundtrip"}
    markdown = (out / "report.md").read_text()
    assert "## Round trip" in markdown and "roundtrip_scores.png" in markdown
    for chart in document["charts"]["roundtrip"]:
        assert (out / chart).read_bytes()[:8] == PNG_MAGIC


def test_eval_roundtrip_with_user_scenes_only_passes_its_thresholds(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path, tmp_path: Path) -> None:
    scenes = tmp_path / "mine.jsonl"
    scenes.write_text(scene_line() + "\n")
    gate = tmp_path / "gate.yaml"
    gate.write_text("roundtrip: {logical_loss_max: 1.0, hyperlexeme_recall: 0}\n")
    result = roundtrip_cli(runner, tiny_base, "--no-shipped-scenes", "--scenes", str(scenes),
                           "--thresholds", str(gate), "-v")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PERSONA", "SCENES", "H-REC", "H-PREC", "LINK-F1", "RELAXED",
                                "SPLIT", "IMPOV", "LOGIC"]
    assert [line.split()[0] for line in lines[1:]] == ["alpha", "beta", "mean"]
    assert "thresholds met (2 checked" in result.stderr
    assert "alpha mine: split link: cat sit on mat" in result.stderr  # -v lists failures


@pytest.mark.parametrize("args, code, message", [
    (["--thresholds", "BAD"], 1, "roundtrip.link_f2: unknown threshold"),
    (["--scenes", "SCENES"], 1, "SCENES:1: invalid JSON"),
    (["--encoder", "psychic"], 2,
     "unknown encoder 'psychic'; registered encoders: default, reader"),
    (["--no-shipped-scenes"], 2, "--no-shipped-scenes needs at least one --scenes FILE"),
])
def test_eval_roundtrip_rejects_bad_input_before_loading_a_model(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path, tmp_path: Path, args: list[str],
        code: int, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("roundtrip: {link_f2: 0.3}\n")
    scenes = tmp_path / "scenes.jsonl"
    scenes.write_text("{oops\n")
    names_the_file = "BAD" in args
    args = [{"BAD": str(bad), "SCENES": str(scenes)}.get(a, a) for a in args]
    result = roundtrip_cli(runner, tiny_base, *args)
    assert result.exit_code == code, result.output
    assert message.replace("SCENES", str(scenes)) in result.stderr
    if names_the_file:
        assert f"Error: {bad}: roundtrip.link_f2" in result.stderr
    assert "Loading" not in result.stderr


def test_a_mood_is_not_a_roundtrip_persona(runner: CliRunner, tiny_base: Path) -> None:
    result = runner.invoke(cli, ["eval", "roundtrip", "--base", str(tiny_base),
                                 "-p", "melancholic"])
    assert result.exit_code == 2 and "unknown persona 'melancholic'" in result.stderr


@pytest.fixture
def data_bundles(plugin_site: Path, tiny_base: Path, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two tiny personas with training and held-out data, so fidelity can run on them."""
    bundles = []
    for seed, name in enumerate(("gamma", "delta"), 3):
        bundle = write_bundle(tmp_path / "bundles", name, adapter_seed=seed, tiny_base=tiny_base)
        (bundle / "data").mkdir()
        lines = [json.dumps({"human": f"Question {i} for {name}?",
                             "text": f"{name} answers {i} about the sea."}) for i in range(3)]
        (bundle / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
        (bundle / "data" / "heldout.jsonl").write_text(lines[0] + "\n")
        bundles.append(bundle)
    install_plugin(plugin_site, "hyperlex-data", "hx_data", bundles_plugin(*bundles))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-data")
    return ["gamma", "delta"]


def test_eval_all_writes_one_report_for_three_evaluations(
        runner: CliRunner, data_bundles: list[str], tiny_base: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate.yaml"
    gate.write_text(textwrap.dedent("""\
        fidelity: {macro_f1_adapter: 0.0}
        routing: {explicit: 1.01}
        roundtrip: {logical_loss_max: 1.0}
        """))
    out = tmp_path / "out"
    result = runner.invoke(cli, ["eval", "all", "--base", str(tiny_base), "-p", "gamma",
                                 "-p", "delta", "--limit", "1", "--max-new-tokens", "4",
                                 "--router", "none", "--report", str(out),
                                 "--thresholds", str(gate), "--guidance", "2"])
    assert result.exit_code == 3, result.output
    for heading in ("## fidelity", "## routing", "## roundtrip"):
        assert heading in result.stdout
    assert "macro_f1:" in result.stdout and "explicit" in result.stdout
    assert "1 metric(s) missed their threshold" in result.stderr
    assert "routing.explicit: 1 < 1.01" in result.stderr
    document = json.loads((out / "report.json").read_text())
    assert list(document["sections"]) == ["fidelity", "routing", "roundtrip"]
    assert document["sections"]["routing"]["cases"].endswith("eval/data/routing.jsonl")
    assert document["sections"]["roundtrip"]["personas"] == ["delta", "gamma"]
    assert len(document["sections"]["roundtrip"]["scenes"]) == 1
    assert document["sections"]["roundtrip"]["guidance"] == 2.0
    assert math.isclose(document["sections"]["routing"]["accuracy"]["explicit"], 1.0)
    markdown = (out / "report.md").read_text()
    for section in ("## Fidelity", "## Routing", "## Round trip"):
        assert section in markdown
    charts = [c for files in document["charts"].values() for c in files]
    assert len(charts) == 7
    for chart in charts:
        assert (out / chart).read_bytes()[:8] == PNG_MAGIC


# the real model ------------------------------------------------------------------------------


@pytest.mark.real_model
def test_eval_roundtrip_on_a_real_persona(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(cli, ["eval", "roundtrip", "-p", "poet", "--limit", "2",
                                 "--json", "--report", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["personas"] == ["poet"] and len(data["results"]["poet"]) == 2
    for entry in data["results"]["poet"]:
        assert len(entry["reply"].split()) >= 5 and "error" not in entry  # a sentence at least
    assert data["metrics"]["poet"]["hyperlexeme_recall"] > 0  # it spoke of the scene
    assert (out / "report.md").is_file() and (out / "roundtrip_scores.png").is_file()


def test_eval_roundtrip_with_guidance_decodes_every_reply_guided(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path) -> None:
    plain = roundtrip_cli(runner, tiny_base, "--limit", "2", "--json", "--engine", "torch")
    guided = roundtrip_cli(runner, tiny_base, "--limit", "2", "--json", "--engine", "torch",
                           "--guidance", "4")
    assert plain.exit_code == 0 and guided.exit_code == 0, guided.output
    before, after = json.loads(plain.stdout), json.loads(guided.stdout)
    assert (before["guidance"], after["guidance"]) == (0.0, 4.0)
    replies = {data["guidance"]: [r["reply"] for name in data["personas"]
                                  for r in data["results"][name]] for data in (before, after)}
    assert replies[0.0] != replies[4.0]
    refused = roundtrip_cli(runner, tiny_base, "--guidance", "4", "--engine", "llamacpp")
    assert refused.exit_code == 2 and "--guidance runs on the torch engine" in refused.output
