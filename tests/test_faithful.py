"""Rejection-sampling self-distillation on the tiny model: every proposal is sampled, a
candidate is kept only when it reads back to its scene and is in the persona's voice, and
the best kept one per scene becomes a speak_scene record."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperlex.eval.faithful import faithful_records
from hyperlex.eval.roundtrip import EvalScene
from hyperlex.persona.bundle import Persona
from hyperlex.scene.model import Delta, Hyperlexeme, Link, Scene
from hyperlex.training.data import parse_record

from .conftest import write_bundle

SCENE = Scene(hyperlexemes={"fox": Hyperlexeme("fox", "fox"),
                            "moon": Hyperlexeme("moon", "moon")},
              links=[Link("fox", "see", "moon", polarity=-1)])
SCENES = [EvalScene("s1", SCENE, None, "test"), EvalScene("s2", SCENE, None, "test")]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path,
           tiny_bundles: dict[str, Path]):
    from hyperlex.engines.torch.engine import TorchEngine

    writer = write_bundle(tmp_path_factory.mktemp("writer"), "scribe", adapter_seed=7,
                          tiny_base=tiny_base, extra_yaml="layer: true\n")
    personas = [Persona.from_dir(tiny_bundles["alpha"]), Persona.from_dir(writer)]
    return TorchEngine(personas, base=str(tiny_base), progress=False)


class Voice:
    """A classifier that gives every reply to ``label`` with ``probability``."""

    def __init__(self, label: str, probability: float = 0.9):
        self.label, self.p = label, probability

    def predict(self, texts: list[str]) -> list[str]:
        return [self.label] * len(texts)

    def probability(self, texts: list[str], label: str) -> list[float]:
        return [self.p if label == self.label else 1 - self.p] * len(texts)


def reads(scene: Scene | None):
    """An encoder that reads every reply back as ``scene`` (None: as nothing)."""
    def encode(text: str) -> Delta:
        if scene is None:
            return Delta()
        return Delta(hyperlexemes=list(scene.hyperlexemes.values()), links=list(scene.links))
    return encode


def params():
    from hyperlex.generation import GenerationParams

    return GenerationParams(temperature=0, max_new_tokens=8)


def test_faithful_candidates_in_the_persona_voice_become_records(engine) -> None:
    run = faithful_records(engine, engine.persona("alpha"), SCENES, [(), (("scribe", 0.5),)],
                           reads(SCENE), Voice("alpha"), params())
    assert run.candidates == 4 and sum(run.accepted.values()) == 4 and not run.refused
    assert [r["meta"]["scene_id"] for r in run.records] == ["s1", "s2"]
    example = parse_record({k: v for k, v in run.records[0].items()})
    assert example.speaks_scene and example.scene.render("all") == SCENE.render("all")
    assert run.records[0]["meta"]["proposal"] in ("alone", "scribe:0.5")


def test_candidates_that_lose_the_scene_or_the_voice_are_refused(engine) -> None:
    lost = faithful_records(engine, engine.persona("alpha"), SCENES, [()], reads(None),
                            Voice("alpha"), params())
    assert lost.records == [] and lost.refused == {"hyperlexeme lost": 2}
    flipped = Scene.from_dict(SCENE.to_dict())
    flipped.links[0].polarity = 1
    negation = faithful_records(engine, engine.persona("alpha"), SCENES, [()], reads(flipped),
                                Voice("alpha"), params())
    assert negation.refused == {"polarity flipped": 2}
    other = faithful_records(engine, engine.persona("alpha"), SCENES, [()], reads(SCENE),
                             Voice("writer"), params())
    assert other.refused == {"voice read as writer": 2}
