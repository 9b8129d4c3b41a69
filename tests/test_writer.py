"""A scene-writer on the tiny model ("scribe": the shipped writer is for the real base): a
persona that is also a layer (`layer: true`),
spoken alone or composed over another persona, the scene prompt that training, chat and the
round trip share, `agent scene say`, and the round trip's composed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperlex.cli import cli
from hyperlex.errors import HyperlexError
from hyperlex.eval.roundtrip import EvalScene, roundtrip
from hyperlex.persona.bundle import BundleError, Persona
from hyperlex.persona.prompt import ChatTemplateCounter, example_prompt, scene_prompt
from hyperlex.scene.model import Hyperlexeme, Link, Scene
from hyperlex.training.data import parse_record

from .conftest import bundles_plugin, install_plugin, write_bundle

SCENE = Scene(hyperlexemes={"sailor": Hyperlexeme("sailor", "sailor"),
                            "lighthouse": Hyperlexeme("lighthouse", "lighthouse")},
              links=[Link("sailor", "see", "lighthouse", polarity=-1)])


@pytest.fixture(scope="module")
def writer_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return write_bundle(tmp_path_factory.mktemp("scribe"), "scribe", adapter_seed=7,
                        tiny_base=tiny_base, extra_yaml="layer: true\n")


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_bundles: dict[str, Path], writer_bundle: Path):
    from hyperlex.engines.torch.engine import TorchEngine

    personas = [Persona.from_dir(tiny_bundles["alpha"]), Persona.from_dir(writer_bundle)]
    return TorchEngine(personas, base=str(tiny_base), progress=False)


def test_a_layer_persona_is_both_a_speaker_and_a_layer(engine) -> None:
    assert "scribe" in engine.personas and "scribe" in engine.moods
    assert "alpha" in engine.personas and "alpha" not in engine.moods
    engine.check_request("alpha", [("scribe", 0.5)])
    with pytest.raises(HyperlexError, match="already speaking"):
        engine.check_request("scribe", [("scribe", 0.5)])


def test_layer_must_be_a_boolean(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, "odd", adapter_seed=None, extra_yaml="layer: yes please\n")
    with pytest.raises(BundleError, match="layer: must be true or false"):
        Persona.from_dir(bundle)


def test_the_writer_speaks_alone_at_full_weight_after_serving_as_a_layer(engine) -> None:
    from hyperlex.generation import GenerationParams

    messages = scene_prompt(engine.persona("scribe"), SCENE, engine)
    greedy = GenerationParams(temperature=0, max_new_tokens=12)
    alone = engine.generate(messages, "scribe", greedy).text
    composed = engine.generate(messages, "alpha", greedy, layers=[("scribe", 0.5)]).text
    assert composed != engine.generate(messages, "alpha", greedy).text
    assert engine.generate(messages, "scribe", greedy).text == alone
    batch = engine.generate_batch([(messages, "scribe"), (messages, "alpha")], greedy)
    assert batch[0].text == alone


def test_a_merged_writer_also_speaks_at_full_weight_after_serving_as_a_layer(
        engine, tiny_base: Path, tiny_bundles: dict[str, Path], writer_bundle: Path) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.generation import GenerationParams

    merged = TorchEngine([Persona.from_dir(tiny_bundles["alpha"]), Persona.from_dir(writer_bundle)],
                         base=str(tiny_base), progress=False, merge=True)
    messages = scene_prompt(merged.persona("scribe"), SCENE, merged)
    greedy = GenerationParams(temperature=0, max_new_tokens=12)
    merged.generate(messages, "alpha", greedy, layers=[("scribe", 0.5)])
    assert (merged.generate(messages, "scribe", greedy).text
            == engine.generate(messages, "scribe", greedy).text)


def test_a_speak_scene_record_trains_on_the_scene_prompt(engine, tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    example = parse_record({"speak_scene": True, "scene": SCENE.to_dict(),
                            "text": "The sailor does not see the lighthouse."})
    writer = engine.persona("scribe")
    counter = ChatTemplateCounter(AutoTokenizer.from_pretrained(tiny_base))
    assert example_prompt(writer, example, counter) == scene_prompt(writer, SCENE, counter)
    assert example.as_record()["speak_scene"] is True


@pytest.mark.parametrize("record, problem", [
    ({"speak_scene": True, "text": "x"}, "needs a non-empty scene"),
    ({"speak_scene": "yes", "scene": SCENE.to_dict(), "text": "x"}, "must be true"),
    ({"speak_scene": True, "human": "hi", "scene": SCENE.to_dict(), "text": "x"},
     "no human or messages"),
])
def test_bad_speak_scene_records_say_what_is_wrong(record: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_record(record)


def test_the_round_trip_reports_each_persona_alone_and_composed(engine) -> None:
    personas = {name: engine.persona(name) for name in ("alpha", "scribe")}
    scenes = [EvalScene("s1", SCENE, None, "test")]
    report = roundtrip(engine, personas, scenes, lambda text: _empty_delta(),
                       layers=(("scribe", 0.5),))
    assert report.personas == ["alpha", "scribe", "alpha+scribe:0.5"]
    composed = report.results["alpha+scribe:0.5"][0]["reply"]
    assert composed != report.results["alpha"][0]["reply"]
    assert set(report.mean()) and report.mean() == _mean_of(report, ["alpha", "scribe"])
    assert "alpha+scribe:0.5" in report.table()


def _empty_delta():
    from hyperlex.scene.model import Delta

    return Delta()


def _mean_of(report, rows: list[str]) -> dict[str, float]:
    return {m: round(sum(report.metrics[r][m] for r in rows) / len(rows), 4)
            for m in report.metrics[rows[0]]}


@pytest.fixture
def writer_plugin(plugin_site: Path, tiny_bundles: dict[str, Path], writer_bundle: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(plugin_site, "hyperlex-tiny", "hx_tiny",
                   bundles_plugin(tiny_bundles["alpha"], writer_bundle))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-tiny")


def test_scene_say_speaks_a_scene_file_and_scores_it(runner, writer_plugin, tiny_base: Path,
                                                     tmp_path: Path) -> None:
    scene_file = tmp_path / "scene.json"
    scene_file.write_text(json.dumps(SCENE.to_dict(), indent=2))
    result = runner.invoke(cli, ["scene", "say", str(scene_file), "-p", "scribe", "--base",
                                 str(tiny_base), "--engine", "torch", "--check", "--json"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert reply["persona"] == "scribe" and isinstance(reply["reply"], str)
    assert reply["score"]["links"]["tp"] + reply["score"]["links"]["fn"] == 1
    composed = runner.invoke(cli, ["scene", "say", str(scene_file), "-p", "alpha", "--mood",
                                   "scribe:0.5", "--base", str(tiny_base), "--engine", "torch"])
    assert composed.exit_code == 0, composed.output
    assert "Loading" not in composed.stdout and "Loading" in composed.stderr


def test_scene_say_names_a_bad_scene_file(runner, writer_plugin, tmp_path: Path) -> None:
    scene_file = tmp_path / "scene.json"
    scene_file.write_text('{"hyperlexemes": [\n  {"id": "a", "label": "a"},\n]}')
    result = runner.invoke(cli, ["scene", "say", str(scene_file)])
    assert result.exit_code != 0
    assert f"{scene_file}:3: invalid JSON" in result.output
    missing = runner.invoke(cli, ["scene", "say", str(tmp_path / "nope.json")])
    assert missing.exit_code != 0 and "scene file not found" in missing.output


def test_scene_say_refuses_an_unknown_layer(runner, writer_plugin, tmp_path: Path) -> None:
    scene_file = tmp_path / "scene.json"
    scene_file.write_text(json.dumps(SCENE.to_dict()))
    result = runner.invoke(cli, ["scene", "say", str(scene_file), "-p", "alpha", "--mood",
                                 "nobody:0.5"])
    assert result.exit_code == 2 and "nobody" in result.output


def test_scene_say_best_of_says_the_sample_whose_round_trip_ranks_first(
        runner, writer_plugin, tiny_base: Path, tmp_path: Path) -> None:
    scene_file = tmp_path / "scene.json"
    scene_file.write_text(json.dumps(SCENE.to_dict()))
    args = ["scene", "say", str(scene_file), "-p", "scribe", "--base", str(tiny_base),
            "--engine", "torch", "--best-of", "3", "-o", "temperature", "1", "-o", "seed", "5"]
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    said = json.loads(result.stdout)
    report = said["best_of"]
    texts = [s["text"] for s in report["samples"]]
    assert report["n"] == 3 and len(set(texts)) == 3  # seeds 5, 6, 7
    ranks = [tuple(s["rank"]) for s in report["samples"]]
    assert report["chosen"] == ranks.index(max(ranks))
    assert said["reply"] == texts[report["chosen"]]
    assert said["score"] == report["samples"][report["chosen"]]["score"]
    plain = runner.invoke(cli, args)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == said["reply"] + "\n"
    assert f"best of 3: sample {report['chosen'] + 1} kept the scene best" in plain.stderr
    greedy = runner.invoke(cli, [*args[:-6], "-o", "temperature", "0"])
    assert greedy.exit_code == 2 and "--best-of 3 needs sampling" in greedy.output


def test_a_flipped_negation_ranks_below_any_faithful_rendering() -> None:
    from hyperlex.eval.roundtrip import read_back, score_roundtrip
    from hyperlex.scene.model import Delta

    def score(*links: Link):
        said = Delta(hyperlexemes=list(SCENE.hyperlexemes.values()), links=list(links))
        return score_roundtrip(SCENE, read_back(said))

    [link] = SCENE.links
    kept = score(link)
    flipped = score(Link(link.src, link.rel, link.dst, polarity=-link.polarity))
    silent = score()
    assert kept.rank > silent.rank > flipped.rank


def test_scene_say_with_guidance_says_what_the_guided_engine_decodes(
        runner, writer_plugin, tiny_base: Path, tiny_bundles: dict[str, Path],
        tmp_path: Path) -> None:
    """--guidance W: the reply is the torch engine's guided reply to the scene prompt against
    the same prompt with an empty scene; llama.cpp refuses it by name."""
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.generation import GenerationParams, Guidance
    from hyperlex.persona.prompt import unguided_prompt

    scene_file = tmp_path / "scene.json"
    scene_file.write_text(json.dumps(SCENE.to_dict()))
    args = ["scene", "say", str(scene_file), "-p", "alpha", "--base", str(tiny_base),
            "-o", "temperature", "0", "-o", "max_new_tokens", "8"]
    result = runner.invoke(cli, [*args, "--guidance", "3", "--json"])
    assert result.exit_code == 0, result.output
    alpha = Persona.from_dir(tiny_bundles["alpha"])
    engine = TorchEngine([alpha], base=str(tiny_base), progress=False)
    params = GenerationParams(temperature=0, max_new_tokens=8)
    expected = engine.generate_batch(
        [(scene_prompt(alpha, SCENE, engine), "alpha")], params,
        guidance=Guidance(3.0, [unguided_prompt(alpha, engine)]))[0].text.strip()
    plain = engine.generate(scene_prompt(alpha, SCENE, engine), "alpha", params).text.strip()
    assert json.loads(result.stdout)["reply"] == expected != plain
    refused = runner.invoke(cli, [*args, "--guidance", "3", "--engine", "llamacpp"])
    assert refused.exit_code == 2 and "--guidance runs on the torch engine" in refused.output
    negative = runner.invoke(cli, [*args, "--guidance", "-1"])
    assert negative.exit_code == 2 and "--guidance" in negative.output
