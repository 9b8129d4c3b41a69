"""Does a mood layer shift the tone while the persona stays recognisable? (``agent eval mood``)

Each persona answers its held-out prompts twice with greedy decoding: alone, and with the
mood adapter composed over it. Two numbers per persona and condition:

- valence: the default scene encoder's field valence of each reply (affect lexicon, with
  negation), averaged;
- tone: the probability, from the fidelity classifier's kind of classifier
  (:class:`hyperlex.eval.fidelity.PersonaClassifier`) fitted on the mood's training replies
  against every persona's, that a reply is in the mood's tone;
- identity: the share of replies the fidelity classifier (fitted on every persona's training
  replies) attributes to the right persona.

A mood works when valence moves in its direction and identity barely drops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hyperlex.eval.batched import generate_replies
from hyperlex.eval.fidelity import (
    Features,
    PersonaClassifier,
    evaluation_params,
    persona_messages,
)
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import Persona

CONDITIONS = ("persona", "persona+mood")


@dataclass
class MoodReport:
    mood: str
    weight: float
    valence: dict[str, dict[str, float]]  # persona -> condition -> mean valence
    tone: dict[str, dict[str, float]]  # persona -> condition -> mean P(mood's tone)
    identity: dict[str, dict[str, float]]  # persona -> condition -> classifier accuracy
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def mean(self, table: dict[str, dict[str, float]], condition: str) -> float:
        return sum(row[condition] for row in table.values()) / max(len(table), 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mood": self.mood, "weight": self.weight,
            "valence": self.valence, "tone": self.tone, "identity": self.identity,
            "mean": {metric: {c: round(self.mean(table, c), 4) for c in CONDITIONS}
                     for metric, table in (("valence", self.valence), ("tone", self.tone),
                                           ("identity", self.identity))},
            "samples": self.samples,
        }

    def table(self) -> str:
        head = (f"{'PERSONA':<12} {'VALENCE':>8} {'+MOOD':>8} {'DELTA':>7} "
                f"{'TONE':>6} {'+MOOD':>6} {'IDENTITY':>9} {'+MOOD':>6}")
        lines = [head]
        rows = [*sorted(self.valence), "mean"]
        for name in rows:
            def cell(table: dict[str, dict[str, float]], condition: str, n: str = name) -> float:
                return self.mean(table, condition) if n == "mean" else table[n][condition]
            v0, v1 = cell(self.valence, CONDITIONS[0]), cell(self.valence, CONDITIONS[1])
            lines.append(
                f"{name:<12} {v0:>+8.3f} {v1:>+8.3f} {v1 - v0:>+7.3f} "
                f"{cell(self.tone, CONDITIONS[0]):>6.2f} "
                f"{cell(self.tone, CONDITIONS[1]):>6.2f} "
                f"{cell(self.identity, CONDITIONS[0]):>9.2f} "
                f"{cell(self.identity, CONDITIONS[1]):>6.2f}")
        return "\n".join(lines)


def mood_shift(engine: Any, personas: dict[str, Persona], prompts: dict[str, list[Any]],
               references: dict[str, list[str]], mood: str, weight: float,
               mood_references: list[str], encoder: Callable[[str], Any],
               features: Features | None = None, params: GenerationParams | None = None,
               batch_size: int = 16,
               progress: Callable[[str], None] | None = None) -> MoodReport:
    """Generate with and without ``mood`` for every persona's ``prompts`` (held-out examples)
    and score valence, tone and identity; ``references`` are every persona's training
    replies, ``mood_references`` the mood's."""
    params = params or evaluation_params()
    say = progress or (lambda message: None)
    classifier = PersonaClassifier(references, features)
    everyone = [text for texts in references.values() for text in texts]
    in_tone = PersonaClassifier({mood: mood_references, "__personas__": everyone}, features)
    valence: dict[str, dict[str, float]] = {}
    tone: dict[str, dict[str, float]] = {}
    identity: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for name in sorted(personas):
        requests = [(persona_messages(personas[name], example, engine), name)
                    for example in prompts[name]]
        replies: dict[str, list[str]] = {}
        for condition in CONDITIONS:
            layers = [(mood, weight)] if condition == "persona+mood" else []
            replies[condition] = generate_replies(engine, requests, params, batch_size,
                                                  layers=layers)
            say(f"{name}: {condition}: {len(replies[condition])} replies")
        valence[name], tone[name], identity[name] = {}, {}, {}
        for condition, texts in replies.items():
            fields = [encoder(text).field for text in texts]
            values = [f.valence if f is not None else 0.0 for f in fields]
            valence[name][condition] = sum(values) / max(len(values), 1)
            tone[name][condition] = sum(in_tone.probability(texts, mood)) / max(len(texts), 1)
            predicted = classifier.predict(texts) if texts else []
            identity[name][condition] = sum(p == name for p in predicted) / max(len(texts), 1)
        samples[name] = [{"human": example.human, **{c: replies[c][i] for c in CONDITIONS}}
                         for i, example in enumerate(prompts[name][:2])]
    return MoodReport(mood, weight, valence, tone, identity, samples)
