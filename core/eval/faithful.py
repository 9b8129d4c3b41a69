"""Rejection-sampling self-distillation (``agent data faithful``): the verifier as teacher.

For a persona and each of N training scenes (the synthetic corpus's ``train`` split: no
evaluation sees them), candidate replies are generated through the one scene prompt
(:func:`hyperlex.persona.prompt.scene_prompt`) under several *proposals*: the persona alone,
and the persona with a layer (the scene-writer) composed over it at each given weight. Each
candidate is read back by the scene encoder and scored as the round trip scores it
(:func:`hyperlex.eval.roundtrip.score_roundtrip`), and the fidelity classifier
(:class:`hyperlex.eval.fidelity.PersonaClassifier`, fitted on the voice data of every
speaker that is not a layer) says whose voice it is in. The scene-writer is left out of the
classifier on purpose: every reply that keeps a scene leans toward its plain sentences, and
the question is whether the reply is still this persona's rather than another's. (With the
writer in, no candidate of the dreamer or the interface was both faithful and theirs.)

A candidate is **accepted** when it keeps the scene (hyperlexeme recall and relaxed link
recall at least the thresholds, no polarity flipped) *and* the classifier gives it to the
persona. The best accepted candidate per scene (links kept, then hyperlexemes, then how
surely it is the persona's voice) becomes a ``speak_scene`` training record; the persona is
then trained on them beside its voice data (``agent train --extra-data``), starting from its
adapter (``--init-adapter``), and the loop repeats while it still gains. This is STaR / RAFT
/ ReST: sample, keep what a reward accepts, fine-tune on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hyperlex.agent.moods import mood_label
from hyperlex.eval.batched import generate_replies
from hyperlex.eval.roundtrip import (
    EvalScene,
    RoundtripScore,
    encode_all,
    read_back,
    score_roundtrip,
)
from hyperlex.generation import GenerationParams, Layers
from hyperlex.persona.bundle import Persona
from hyperlex.persona.prompt import scene_prompt
from hyperlex.scene.model import Delta

MIN_HYPERLEXEME_RECALL = 0.75
MIN_LINK_RECALL = 0.5


@dataclass
class Candidate:
    scene: EvalScene
    proposal: str
    reply: str
    score: RoundtripScore
    voice: str  # the persona the classifier attributes the reply to
    voice_probability: float  # its probability that the reply is the persona's own

    def rank(self) -> tuple[float, float, float]:
        return (self.score.links_relaxed["recall"], self.score.hyperlexemes["recall"],
                self.voice_probability)


@dataclass
class FaithfulRun:
    """What one persona's round produced: the records, and why the rest were refused."""

    persona: str
    records: list[dict[str, Any]]
    candidates: int
    accepted: Counter[str] = field(default_factory=Counter)  # proposal -> accepted candidates
    refused: Counter[str] = field(default_factory=Counter)  # reason -> candidates
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # one per candidate

    def as_dict(self) -> dict[str, Any]:
        return {"persona": self.persona, "records": len(self.records),
                "candidates": self.candidates, "accepted": dict(self.accepted),
                "refused": dict(self.refused), "verdicts": self.verdicts}


def refusal(candidate: Candidate, persona: str, min_recall: float,
            min_link_recall: float) -> str | None:
    """Why ``candidate`` is not kept (None: it is)."""
    score = candidate.score
    if score.logical_loss:
        return "polarity flipped"
    if score.hyperlexemes["recall"] < min_recall:
        return "hyperlexeme lost"
    if score.links_relaxed["recall"] < min_link_recall:
        return "link lost"
    if candidate.voice != persona:
        return f"voice read as {candidate.voice}"
    return None


def faithful_records(engine: Any, persona: Persona, scenes: Sequence[EvalScene],
                     proposals: Sequence[Layers], encoder: Callable[[str], Delta],
                     classifier: Any, params: GenerationParams, batch_size: int = 16,
                     min_recall: float = MIN_HYPERLEXEME_RECALL,
                     min_link_recall: float = MIN_LINK_RECALL,
                     progress: Callable[[str], None] | None = None) -> FaithfulRun:
    """One persona's round (see the module docstring); ``proposals``: the layer stacks to
    sample under (``()``: the persona alone)."""
    say = progress or (lambda message: None)
    name = persona.name
    candidates: list[Candidate] = []
    for stack in proposals:
        label = ",".join(str(mood_label(layer)) for layer in stack) or "alone"
        requests = [(scene_prompt(persona, item.scene, engine), name) for item in scenes]
        replies = generate_replies(
            engine, requests, params, batch_size,
            lambda done, total, label=label: say(f"{name} ({label}): {done}/{total}"),
            layers=stack)
        deltas = encode_all(encoder, replies)
        voices = classifier.predict(replies)
        mine = classifier.probability(replies, name)
        for item, reply, delta, voice, probability in zip(scenes, replies, deltas, voices, mine,
                                                          strict=True):
            score = score_roundtrip(item.scene, read_back(delta), reply)
            candidates.append(Candidate(item, label, reply, score, voice, probability))

    run = FaithfulRun(name, [], len(candidates))
    best: dict[str, Candidate] = {}
    for candidate in candidates:
        reason = refusal(candidate, name, min_recall, min_link_recall)
        run.verdicts.append({
            "scene": candidate.scene.id, "proposal": candidate.proposal,
            "hyperlexeme_recall": candidate.score.hyperlexemes["recall"],
            "link_recall_relaxed": candidate.score.links_relaxed["recall"],
            "polarity_flips": len(candidate.score.logical_loss), "voice": candidate.voice,
            "voice_probability": round(candidate.voice_probability, 3),
            "refused": reason, "reply": candidate.reply})
        if reason is not None:
            run.refused[reason] += 1
            continue
        run.accepted[candidate.proposal] += 1
        kept = best.get(candidate.scene.id)
        if kept is None or candidate.rank() > kept.rank():
            best[candidate.scene.id] = candidate
    for item in scenes:
        if (chosen := best.get(item.id)) is not None:
            run.records.append({
                "speak_scene": True, "scene": item.scene.to_dict(), "text": chosen.reply,
                "meta": {"self_distilled": True, "scene_id": item.id,
                         "proposal": chosen.proposal,
                         "hyperlexeme_recall": chosen.score.hyperlexemes["recall"],
                         "link_recall_relaxed": chosen.score.links_relaxed["recall"],
                         "voice_probability": round(chosen.voice_probability, 3)}})
    return run
