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

from hyperlex.errors import HyperlexError
from hyperlex.eval.faithful import chat_records, states_negation
from hyperlex.eval.roundtrip import EvalScene, composed_row
from hyperlex.generation import Layers
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
        return {"statements": self.statements,
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
                  progress: Callable[[str], None] | None = None) -> NegationReport:
    """Every persona answers every statement alone, and with each ``(layer, weight)`` of
    ``layers`` composed over it; see the module docstring."""
    report = NegationReport(len(statements), {})
    for name in sorted(personas):
        persona = personas[name]
        params = dataclasses.replace(persona.contract.params(), seed=seed)
        stacks: list[tuple[str, Layers]] = [(name, ()), *(
            (composed_row(name, layer, weight), ((layer, weight),))
            for layer, weight in layers if layer != name)]
        for row, stack in stacks:
            run = chat_records(engine, persona, statements, [(stack, params)], encoder,
                               classifier, batch_size, progress)
            report.replies[row] = run.verdicts
    return report
