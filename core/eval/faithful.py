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
persona (and, where the caller checks it, names no command that does not exist: the
interface's replies point at commands). The best accepted candidate per scene (links kept,
then hyperlexemes, then how surely it is the persona's voice) becomes a ``speak_scene``
training record; the persona is then trained on them beside its voice data (``agent train
--extra-data``), starting from its adapter (``--init-adapter``), and the loop repeats while
it still gains. This is STaR / RAFT / ReST: sample, keep what a reward accepts, fine-tune on
it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hyperlex.agent.moods import mood_label
from hyperlex.agent.verify import ReplyProblem, sample_params
from hyperlex.eval.batched import generate_replies
from hyperlex.eval.roundtrip import (
    EvalScene,
    RoundtripScore,
    encode_all,
    read_back,
    score_roundtrip,
)
from hyperlex.generation import GenerationParams, Guidance, Layers, Message
from hyperlex.persona.bundle import Persona
from hyperlex.persona.prompt import build_prompt, scene_prompt
from hyperlex.scene.model import Delta, opening_scene

MIN_HYPERLEXEME_RECALL = 0.75
MIN_LINK_RECALL = 0.5
NAMES_NO_SUCH_COMMAND = "named a command that does not exist"


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


@dataclass(frozen=True)
class Proposal:
    """One way of sampling candidates: the layer stack composed over the persona (``()``:
    alone), the sampling parameters, and scene guidance's weight (0: none; the negative
    prompt is the same prompt without its scene)."""

    layers: Layers
    params: GenerationParams
    guidance: float = 0.0

    @property
    def label(self) -> str:
        label = ",".join(str(mood_label(layer)) for layer in self.layers) or "alone"
        return label + (f" guided {self.guidance:g}" if self.guidance else "")


def chat_proposals(stacks: Sequence[Layers], params: GenerationParams, samples: int,
                   guidance: float = 0.0) -> list[Proposal]:
    """A chat round's proposals: every layer stack sampled with seeds 1..``samples`` (as
    ``agent chat --best-of`` seeds its samples), plain, and again guided at ``guidance`` when
    it is not 0."""
    weights = (0.0, guidance) if guidance else (0.0,)
    seeded = sample_params(replace(params, seed=1), samples)
    return [Proposal(stack, sample, weight) for weight in weights
            for stack in stacks for sample in seeded]


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
                     progress: Callable[[str], None] | None = None,
                     reply_problem: ReplyProblem | None = None) -> FaithfulRun:
    """One persona's round (see the module docstring); ``proposals``: the layer stacks to
    sample under (``()``: the persona alone); ``reply_problem``: as :func:`_select` takes it."""
    candidates = _sample(engine, persona, scenes, [Proposal(stack, params) for stack in proposals],
                         lambda item: scene_prompt(persona, item.scene, engine), encoder,
                         classifier, batch_size, progress, numbered=False)

    def verdict(candidate: Candidate) -> dict[str, Any]:
        return {"scene": candidate.scene.id,
                "hyperlexeme_recall": candidate.score.hyperlexemes["recall"],
                "link_recall_relaxed": candidate.score.links_relaxed["recall"],
                "polarity_flips": len(candidate.score.logical_loss)}

    def record(item: EvalScene, chosen: Candidate) -> dict[str, Any]:
        return {"speak_scene": True, "scene": item.scene.to_dict(), "text": chosen.reply,
                "meta": {"self_distilled": True, "scene_id": item.id,
                         "proposal": chosen.proposal,
                         "hyperlexeme_recall": chosen.score.hyperlexemes["recall"],
                         "link_recall_relaxed": chosen.score.links_relaxed["recall"],
                         "voice_probability": round(chosen.voice_probability, 3)}}

    return _select(persona.name, scenes, candidates,
                   lambda c: refusal(c, persona.name, min_recall, min_link_recall),
                   verdict, record, reply_problem)


def _sample(engine: Any, persona: Persona, items: Sequence[EvalScene],
            proposals: Sequence[Proposal], prompt: Callable[[EvalScene], list[Message]],
            encoder: Callable[[str], Delta], classifier: Any, batch_size: int,
            progress: Callable[[str], None] | None, numbered: bool = True,
            negative: Callable[[EvalScene], list[Message]] | None = None) -> list[Candidate]:
    """Every proposal's reply to every item, read back, scored against the item's scene and
    attributed to a voice. A candidate's proposal is the proposal's label, and with
    ``numbered`` its place in ``proposals`` (``writer:0.5#1``), which tells samples apart.
    ``negative``: an item's negative prompt, for the proposals decoded with guidance."""
    say = progress or (lambda message: None)
    name = persona.name
    requests = [(prompt(item), name) for item in items]
    negatives = None
    if any(proposal.guidance for proposal in proposals):
        if negative is None:
            raise ValueError("a guided proposal needs the items' negative prompts")
        negatives = [negative(item) for item in items]  # shared by every guided proposal
    candidates: list[Candidate] = []
    for number, proposal in enumerate(proposals):
        label = proposal.label + (f"#{number}" if numbered else "")
        guidance = Guidance(proposal.guidance, negatives) if proposal.guidance else None
        replies = generate_replies(
            engine, requests, proposal.params, batch_size,
            lambda done, total, label=label: say(f"{name} ({label}): {done}/{total}"),
            layers=proposal.layers, guidance=guidance)
        candidates += _candidates(name, items, label, replies, encode_all(encoder, replies),
                                  classifier)
    return candidates


def _candidates(name: str, items: Sequence[EvalScene], label: str, replies: list[str],
                readings: Sequence[Delta | Exception], classifier: Any,
                attributions: Sequence[tuple[str, float]] | None = None) -> list[Candidate]:
    """Each reply to its item, scored against the item's scene from its reading, and
    attributed to a voice (``attributions``: ``classifier.attribute(replies, name)`` where
    the caller has it already)."""
    if attributions is None:
        attributions = classifier.attribute(replies, name)
    return [Candidate(item, label, reply, score_roundtrip(item.scene, read_back(delta), reply),
                      voice, probability)
            for item, reply, delta, (voice, probability)
            in zip(items, replies, readings, attributions, strict=True)]


def _select(name: str, items: Sequence[EvalScene], candidates: list[Candidate],
            refuse: Callable[[Candidate], str | None],
            verdict: Callable[[Candidate], dict[str, Any]],
            record: Callable[[EvalScene, Candidate], dict[str, Any]],
            reply_problem: ReplyProblem | None = None) -> FaithfulRun:
    """The run: a verdict per candidate, and a record of the best accepted one per item.
    ``reply_problem``: what else is wrong with a reply that keeps its scene in the voice (a
    command that does not exist, :mod:`hyperlex.cli.command_refs`); such a candidate is
    refused as :data:`NAMES_NO_SUCH_COMMAND`, with the problem in its verdict."""
    run = FaithfulRun(name, [], len(candidates))
    best: dict[str, Candidate] = {}
    for candidate in candidates:
        reason = refuse(candidate)
        problem = reply_problem(candidate.reply) if reply_problem and reason is None else None
        if problem is not None:
            reason = NAMES_NO_SUCH_COMMAND
        run.verdicts.append({
            **verdict(candidate), "proposal": candidate.proposal, "voice": candidate.voice,
            "voice_probability": round(candidate.voice_probability, 3),
            "refused": reason, **({"problem": problem} if problem else {}),
            "reply": candidate.reply})
        if reason is not None:
            run.refused[reason] += 1
            continue
        run.accepted[candidate.proposal] += 1
        kept = best.get(candidate.scene.id)
        if kept is None or candidate.rank() > kept.rank():
            best[candidate.scene.id] = candidate
    run.records = [record(item, chosen) for item in items
                   if (chosen := best.get(item.id)) is not None]
    return run


# chat turns ---------------------------------------------------------------------------------
#
# The records above teach a persona to speak a scene when asked to. In a conversation nobody
# asks: the user states a fact ("The old fisherman does not trust the sea.") and the persona
# answers in its voice with that fact in its scene. A chat round samples such turns, built by
# the same prompt builder as chat, and keeps the replies that keep every negated fact of the
# message (read back, matched, polarity intact) in the persona's voice.

_SENTENCE_END = re.compile(r"(?<=[.;])\s+")


def chat_statements(count: int, split: str = "train", seed: int = 0,
                    encoder: Callable[[str], Delta] | None = None) -> list[EvalScene]:
    """``count`` user messages that state at least one negated fact: the first negated
    sentence of a synthetic corpus scene of ``split`` (and the sentence after it), each with
    the scene a conversation holds once the user has said it (``encoder``'s reading, said by
    the user on turn 0). ``reference`` is the message."""
    from hyperlex.scene.encoders import DefaultEncoder
    from hyperlex.training.synth import scene_records

    encoder = encoder or DefaultEncoder()
    statements: list[EvalScene] = []
    pool = scene_records(50 * count + 100, split, seed, encoder=encoder)
    for record in pool:
        if len(statements) == count:
            break
        if not record["negated"]:
            continue
        sentences = [_sentence(s) for s in _SENTENCE_END.split(record["reference"])
                     if not s.startswith("Think of")]
        first = next((i for i, s in enumerate(sentences) if states_negation(encoder(s))), None)
        if first is None:
            continue
        text = " ".join(sentences[first:first + 2])
        delta = encoder(text)
        if not states_negation(delta):
            continue
        statements.append(EvalScene(f"chat-{record['id']}", opening_scene(delta), text, "synth"))
    if len(statements) < count:
        raise RuntimeError(f"only {len(statements)} of {count} negated statements found")
    return statements


def _sentence(text: str) -> str:
    text = text.strip().rstrip(";").rstrip(".") + "."
    for opener in ("Meanwhile, ", "Then, ", "Later, ", "After that, ", "Soon, "):
        text = text.removeprefix(opener)
    return text[:1].upper() + text[1:]


def states_negation(delta: Delta) -> bool:
    """Whether ``delta`` holds a negated link."""
    return any(link.polarity < 0 for link in delta.links)


def chat_prompt(persona: Persona, statement: EvalScene, counter: Any) -> list[Message]:
    """What ``persona`` answers to when a conversation opens with ``statement``: the
    statement's scene in the system message, then the statement (as ``agent chat`` builds it,
    and as training rebuilds it from the record)."""
    return build_prompt(persona, statement.reference, scene=statement.scene, counter=counter)


def chat_guidance(persona: Persona, statements: Sequence[EvalScene], weight: float,
                  counter: Any) -> Guidance | None:
    """Scene guidance for :func:`chat_prompt`: each negative prompt is the same conversation
    with no scene in the system message (None at weight 0)."""
    if not weight:
        return None
    return Guidance(weight, [unscened_chat(persona, item, counter) for item in statements])


def unscened_chat(persona: Persona, statement: EvalScene, counter: Any) -> list[Message]:
    """:func:`chat_prompt` with no scene in the system message: scene guidance's negative."""
    return build_prompt(persona, statement.reference, counter=counter)


def chat_refusal(candidate: Candidate, persona: str) -> str | None:
    """Why a chat-turn ``candidate`` is not kept (None: it is): it must keep every negated
    fact of the message and be in the persona's voice."""
    score = candidate.score
    if score.logical_loss:
        return "polarity flipped"
    if score.negations_kept < score.negations:
        return "negation lost"
    if candidate.voice != persona:
        return f"voice read as {candidate.voice}"
    return None


def chat_records(engine: Any, persona: Persona, statements: Sequence[EvalScene],
                 proposals: Sequence[Proposal], encoder: Callable[[str], Delta],
                 classifier: Any, batch_size: int = 16,
                 progress: Callable[[str], None] | None = None,
                 reply_problem: ReplyProblem | None = None) -> FaithfulRun:
    """One persona's chat round: each proposal answers every statement (a guided one with
    :func:`chat_guidance`'s negative prompts); the best kept reply per statement becomes an
    ordinary ``human``/``scene``/``text`` record (``reply_problem``: as :func:`_select`)."""
    candidates = _sample(engine, persona, statements, proposals,
                         lambda item: chat_prompt(persona, item, engine), encoder, classifier,
                         batch_size, progress,
                         negative=lambda item: unscened_chat(persona, item, engine))
    return _chat_run(persona.name, statements, candidates, reply_problem)


def chat_verdicts(persona: str, statements: Sequence[EvalScene], label: str,
                  replies: list[str], readings: Sequence[Delta | Exception],
                  classifier: Any,
                  attributions: Sequence[tuple[str, float]] | None = None) -> FaithfulRun:
    """:func:`chat_records`' run for replies chosen elsewhere (one per statement, with the
    encoder's reading of each and, if the caller has it, the classifier's attribution)."""
    return _chat_run(persona, statements,
                     _candidates(persona, statements, label, replies, readings, classifier,
                                 attributions))


def _chat_run(name: str, statements: Sequence[EvalScene], candidates: list[Candidate],
              reply_problem: ReplyProblem | None = None) -> FaithfulRun:
    def verdict(candidate: Candidate) -> dict[str, Any]:
        return {"statement": candidate.scene.reference,
                "negations": candidate.score.negations,
                "negations_kept": candidate.score.negations_kept}

    def record(item: EvalScene, chosen: Candidate) -> dict[str, Any]:
        return {"human": item.reference, "scene": item.scene.to_dict(), "text": chosen.reply,
                "meta": {"self_distilled": True, "chat_turn": True, "statement_id": item.id,
                         "proposal": chosen.proposal,
                         "voice_probability": round(chosen.voice_probability, 3)}}

    return _select(name, statements, candidates, lambda c: chat_refusal(c, name), verdict,
                   record, reply_problem)
