"""Does a persona keep a negated fact in a conversation? (``agent eval negation``)

The round trip asks a persona to *say* a scene. In a conversation nobody asks: the user
states something ("The old fisherman does not trust the sea.") and the persona answers in
its voice. Each held-out statement opens a conversation (the statement's scene in the system
message, then the statement, as ``agent chat`` builds it), the persona answers with its
contract's sampling settings under a fixed seed, and the default encoder reads the reply
back. A reply **keeps** the statement when every negated link of the statement is matched
(strictly or relaxed, as the round trip matches links) by a negated link of the reply; it
**flips** it when a matched link's polarity changed (a negation lost, or one invented on
the statement's other facts); the fidelity classifier says whose **voice** it is in.

The reading is strict: "he does not trust it" keeps the fact for a person and loses it for
the encoder, which does not resolve pronouns. The rates are a lower bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hyperlex.agent.verify import ReplyProblem, best, check_reply, sample_params
from hyperlex.errors import HyperlexError
from hyperlex.eval.batched import generate_replies
from hyperlex.eval.faithful import (
    Proposal,
    chat_guidance,
    chat_prompt,
    chat_records,
    chat_verdicts,
    states_negation,
)
from hyperlex.eval.roundtrip import EvalScene, composed_row, encode_all
from hyperlex.generation import GenerationParams, Layers
from hyperlex.persona.bundle import Persona
from hyperlex.scene.model import Delta, opening_scene

STATEMENTS = "negated_statements.txt"


def load_statements(encoder: Callable[[str], Delta], path: Path | None = None
                    ) -> list[EvalScene]:
    """The statements of ``path`` (default: the shipped held-out ones), one per line, ``#``
    comments skipped, each with the scene the user's turn leaves; a line that reads back with
    no negated link is an error naming it."""
    if path is None:
        text = resources.files("hyperlex.eval").joinpath("data", STATEMENTS).read_text("utf-8")
        where = STATEMENTS
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise HyperlexError(f"{path}: cannot read the statements ({exc})") from None
        where = str(path)
    statements, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        delta = encoder(line)
        if not states_negation(delta):
            problems.append(f"{where}:{number}: {line!r} reads back with no negated link")
            continue
        statements.append(EvalScene(f"{where}:{number}", opening_scene(delta), line, where))
    if problems:
        raise HyperlexError("statements without a negation:\n" + "\n".join(problems))
    if not statements:
        raise HyperlexError(f"{where}: no statements")
    return statements


@dataclass
class NegationReport:
    """Per row (a persona, or ``PERSONA+LAYER:WEIGHT``), the verdict on each statement's
    reply (:func:`hyperlex.eval.faithful.chat_records`' verdicts); the rates come from them."""

    statements: int
    replies: dict[str, list[dict[str, Any]]]
    best_of: int = 1
    guidance: float = 0.0

    @property
    def rows(self) -> list[str]:
        return list(self.replies)

    def rates(self, row: str) -> dict[str, float]:
        persona = row.partition("+")[0]
        verdicts = self.replies[row]
        counts = {
            "kept": sum(v["negations_kept"] == v["negations"] for v in verdicts),
            "flipped": sum(v["refused"] == "polarity flipped" for v in verdicts),
            "own_voice": sum(v["voice"] == persona for v in verdicts),
            "kept_in_voice": sum(v["refused"] is None for v in verdicts),
        }
        return {key: count / self.statements for key, count in counts.items()}

    def as_dict(self) -> dict[str, Any]:
        return {"statements": self.statements, "best_of": self.best_of,
                "guidance": self.guidance,
                "rows": {row: {**self.rates(row), "replies": self.replies[row]}
                         for row in self.rows}}

    def table(self) -> str:
        lines = [f"{'speaker':<28} {'kept':>6} {'flipped':>8} {'voice':>6} {'both':>6}"]
        for row in self.rows:
            r = self.rates(row)
            lines.append(f"{row:<28} {r['kept']:>6.2f} {r['flipped']:>8.2f} "
                         f"{r['own_voice']:>6.2f} {r['kept_in_voice']:>6.2f}")
        return "\n".join(lines)


def negation_eval(engine: Any, personas: dict[str, Persona], statements: Sequence[EvalScene],
                  encoder: Callable[[str], Delta], classifier: Any, seed: int = 0,
                  layers: Layers = (), batch_size: int = 16,
                  progress: Callable[[str], None] | None = None,
                  best_of: int = 1, guidance: float = 0.0,
                  reply_problem: ReplyProblem | None = None) -> NegationReport:
    """Every persona answers every statement alone, and with each ``(layer, weight)`` of
    ``layers`` composed over it; see the module docstring. With ``best_of`` > 1 each reply
    is the one of ``best_of`` samples that ``agent chat --best-of`` would give; with
    ``guidance`` every reply is decoded with scene guidance at that weight
    (:func:`hyperlex.eval.faithful.chat_guidance`); ``reply_problem`` ranks best of n as
    ``agent chat`` does (a sample naming a command that does not exist below the others)."""
    report = NegationReport(len(statements), {}, best_of, guidance)
    for name in sorted(personas):
        persona = personas[name]
        params = dataclasses.replace(persona.contract.params(), seed=seed)
        stacks: list[tuple[str, Layers]] = [(name, ()), *(
            (composed_row(name, layer, weight), ((layer, weight),))
            for layer, weight in layers if layer != name)]
        for row, stack in stacks:
            if best_of == 1:
                run = chat_records(engine, persona, statements,
                                   [Proposal(stack, params, guidance)], encoder, classifier,
                                   batch_size, progress)
            else:
                replies, readings, attributions = best_replies(
                    engine, persona, statements, stack, params, best_of, encoder, classifier,
                    batch_size, progress, guidance, reply_problem)
                run = chat_verdicts(name, statements, f"best of {best_of}", replies, readings,
                                    classifier, attributions)
            report.replies[row] = run.verdicts
    return report


def best_replies(engine: Any, persona: Persona, statements: Sequence[EvalScene], stack: Layers,
                 params: GenerationParams, best_of: int, encoder: Callable[[str], Delta],
                 classifier: Any, batch_size: int = 16,
                 progress: Callable[[str], None] | None = None, guidance: float = 0.0,
                 reply_problem: ReplyProblem | None = None
                 ) -> tuple[list[str], list[Delta | Exception], list[tuple[str, float]]]:
    """Per statement, the reply :mod:`hyperlex.agent.verify` chooses among ``best_of``
    samples (seeds ``seed + i``, each sample batched over the statements), its reading, and
    the classifier's attribution of it (``classifier.attribute``). The statement is the
    conversation's first user turn (turn 0)."""
    say = progress or (lambda message: None)
    requests = [(chat_prompt(persona, item, engine), persona.name) for item in statements]
    guided = chat_guidance(persona, statements, guidance, engine)
    samples = []
    for number, sample in enumerate(sample_params(params, best_of)):
        samples.append(generate_replies(
            engine, requests, sample, batch_size,
            lambda done, total, n=number: say(f"{persona.name} (sample {n + 1}/{best_of}): "
                                              f"{done}/{total}"),
            layers=stack, guidance=guided))
    texts = [sample[j] for j in range(len(statements)) for sample in samples]
    readings = encode_all(encoder, texts)
    attributions = classifier.attribute(texts, persona.name)
    chosen = []
    for j, item in enumerate(statements):
        group = range(j * best_of, (j + 1) * best_of)
        checks = [check_reply(item.scene, 0, _delta(readings[k]), i, attributions[k][1],
                              reply_problem(texts[k]) if reply_problem else None)
                  for i, k in enumerate(group)]
        chosen.append(group[best(checks).index])
    return ([texts[k] for k in chosen], [readings[k] for k in chosen],
            [attributions[k] for k in chosen])


def _delta(reading: Delta | Exception) -> Delta:
    return Delta() if isinstance(reading, Exception) else reading
