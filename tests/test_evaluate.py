"""`agent eval fidelity` pieces on the tiny model, with the real stylometric classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperlex.errors import HyperlexError
from hyperlex.eval.fidelity import PersonaClassifier, fidelity, gain_recovery, macro_f1
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import Persona
from hyperlex.training.data import Example

REFERENCES = {
    "alpha": ["The sea is wide and blue and the waves sing.",
              "Moonlight on the water, a song of tides.",
              "Waves and salt and the long blue horizon."],
    "beta": ["The derivative of x squared is two x.",
             "Multiply both sides by three and solve for y.",
             "The integral of a constant is linear in x."],
}


def test_gain_recovery_formula() -> None:
    assert gain_recovery(3.0, 2.0, 2.2) == pytest.approx(0.8)
    assert gain_recovery(3.0, 2.0, 1.5) == pytest.approx(1.5)
    assert gain_recovery(3.0, 3.1, 2.0) is None  # the prompt gains nothing


def test_the_classifier_hears_the_voice_not_the_subject() -> None:
    # the poet never wrote of bread, the logician never of the sea: the voice is in how
    # each writes, and each held-out reply is about the other's subject
    classifier = PersonaClassifier({
        "poet": ["the sea — slow, silver, singing.", "a lamp — low, amber, waiting.",
                 "the road — long, dusty, turning."],
        "logician": ["If the bread is warm, then the oven is on.",
                     "If the clock is wrong, then the train is late.",
                     "If the river is high, then the bridge is closed."]})
    predicted = classifier.predict(["the bread — warm, golden, rising.",
                                    "If the sea is calm, then the harbour is quiet."])
    assert predicted == ["poet", "logician"]
    score, matrix = macro_f1(["poet", "logician"], predicted, ["logician", "poet"])
    assert score == 1.0 and matrix == [[1, 0], [0, 1]]


def test_a_classifier_with_nothing_to_learn_from_says_so() -> None:
    with pytest.raises(HyperlexError, match="cannot fit the voice classifier on the reference "
                                            "replies of a, b: too few or too short"):
        PersonaClassifier({"a": ["x"], "b": ["y"]})


def test_fidelity_report_covers_every_condition(tiny_base: Path,
                                                tiny_bundles: dict[str, Path]) -> None:
    from hyperlex.engines.torch.engine import TorchEngine

    personas = {n: Persona.from_dir(p) for n, p in tiny_bundles.items()}
    engine = TorchEngine(list(personas.values()), base=str(tiny_base))
    heldout = {n: [Example(human="What is time?", text=REFERENCES[n][0])] for n in personas}
    report = fidelity(engine, personas, heldout, REFERENCES,
                      params=GenerationParams(temperature=0, max_new_tokens=6))
    assert set(report.macro_f1) == {"base", "prompted", "adapter"}
    assert all(0 <= v <= 1 for v in report.macro_f1.values())
    assert all(len(m) == 2 for m in report.confusion.values())
    for name in personas:
        assert set(report.nll[name]) == {"base", "prompted", "adapter"}
        assert report.neutral_ppl_ratio[name] > 0
    assert "| alpha |" in report.table()
    # the judge itself, on the held-out references (each one of its training replies here)
    assert report.reference_f1 == 1.0 and "| references |" in report.table()
    assert set(json.loads(json.dumps(report.as_dict()))["met"]) == {
        "macro_f1", "gain_recovery", "neutral_ppl_ratio"}


def test_attribution_is_the_prediction_and_the_probability_from_one_pass() -> None:
    from sklearn.preprocessing import FunctionTransformer

    calls = []

    def features(texts: list[str]) -> list[list[float]]:
        calls.append(len(texts))
        return [[float("sea" in t), float("proof" in t)] for t in texts]

    classifier = PersonaClassifier({"poet": ["the sea sings", "sea and moon"],
                                    "logician": ["a proof holds", "proof by cases"]},
                                   FunctionTransformer(features))
    texts = ["the sea at night", "a short proof"]
    calls.clear()
    attributed = classifier.attribute(texts, "poet")
    assert calls == [2]
    assert [name for name, _ in attributed] == classifier.predict(texts) == ["poet", "logician"]
    assert [p for _, p in attributed] == classifier.probability(texts, "poet")
    assert attributed[0][1] > 0.5 > attributed[1][1]
    assert classifier.attribute([], "poet") == []


def test_mood_shift_scores_every_persona_alone_and_with_the_mood(
        tiny_base: Path, tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.eval.mood import CONDITIONS, mood_shift
    from hyperlex.host import Host

    from .conftest import write_bundle

    gloom = write_bundle(tmp_path, "gloom", adapter_seed=7, tiny_base=tiny_base,
                         extra_yaml="kind: mood\n")
    personas = {n: Persona.from_dir(p) for n, p in tiny_bundles.items()}
    engine = TorchEngine([*personas.values(), Persona.from_dir(gloom)], base=str(tiny_base),
                         progress=False)
    prompts = {n: [Example(human="What is time?", text=REFERENCES[n][0])] for n in personas}
    sad = ["Grey rain, and nothing left.", "The lamp is out, the room is cold."]
    report = mood_shift(engine, personas, prompts, REFERENCES, "gloom", 1.0, sad,
                        Host().scene_encoders["default"],
                        params=GenerationParams(temperature=0, max_new_tokens=6))
    for table in (report.valence, report.tone, report.identity):
        assert set(table) == set(personas)
        assert all(set(table[n]) == set(CONDITIONS) for n in personas)
    assert all(0.0 <= report.tone[n][c] <= 1.0 and 0.0 <= report.identity[n][c] <= 1.0
               for n in personas for c in CONDITIONS)
    assert all(-1.0 <= report.valence[n][c] <= 1.0 for n in personas for c in CONDITIONS)
    assert [s["human"] for s in report.samples["alpha"]] == ["What is time?"]
