"""Routing accuracy on a labelled set (``agent eval routing``).

The set is JSON lines: ``{"message", "expected", "kind", "current"}`` where ``kind`` is
``explicit`` (an @address), ``words`` (a request in words) or ``implicit`` (the router must
infer the persona, or keep ``current`` for a neutral follow-up). Each message is routed on
its own, as the next turn after ``current``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperlex.agent.router import TurnRouter
from hyperlex.errors import HyperlexError

KINDS = ("explicit", "words", "implicit")
TARGETS = {"explicit": 1.0, "words": 1.0, "implicit": 0.85}


@dataclass
class RoutingCase:
    message: str
    expected: str
    kind: str
    current: str | None = None


@dataclass
class RoutingReport:
    accuracy: dict[str, float]
    counts: dict[str, int]
    errors: list[dict[str, Any]] = field(default_factory=list)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def passed(self) -> dict[str, bool]:
        return {kind: self.accuracy[kind] >= target for kind, target in TARGETS.items()
                if kind in self.accuracy}

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "counts": self.counts, "targets": TARGETS,
                "passed": self.passed, "confusion": self.confusion, "errors": self.errors}

    def table(self) -> str:
        lines = [f"{'KIND':<10} {'N':>4} {'ACCURACY':>9} {'TARGET':>7}"]
        for kind in (*KINDS, "all"):
            if kind in self.accuracy:
                target = f"{TARGETS[kind]:.2f}" if kind in TARGETS else ""
                lines.append(f"{kind:<10} {self.counts[kind]:>4} {self.accuracy[kind]:>9.3f} "
                             f"{target:>7}")
        return "\n".join(lines)


def load_cases(path: Path, personas: set[str]) -> list[RoutingCase]:
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            case = RoutingCase(row["message"], row["expected"], row["kind"], row.get("current"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HyperlexError(f"{where}: not a routing case ({exc})") from None
        if case.kind not in KINDS:
            raise HyperlexError(f"{where}: kind must be one of {', '.join(KINDS)}")
        for name in (case.expected, case.current):
            if name is not None and name not in personas:
                raise HyperlexError(f"{where}: unknown persona {name!r}")
        cases.append(case)
    if not cases:
        raise HyperlexError(f"{path}: no routing cases")
    return cases


def evaluate_routing(router: TurnRouter, cases: list[RoutingCase]) -> RoutingReport:
    hits: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    errors = []
    for case in cases:
        decision = router.decide(case.message, None, case.current)
        ok = decision.persona == case.expected
        for kind in (case.kind, "all"):
            counts[kind] += 1
            hits[kind] += ok
        confusion[case.expected][decision.persona] += 1
        if not ok:
            errors.append({"message": case.message, "kind": case.kind, "current": case.current,
                           "expected": case.expected, "got": decision.persona,
                           "reason": decision.reason})
    return RoutingReport(
        accuracy={kind: hits[kind] / counts[kind] for kind in counts},
        counts=dict(counts),
        errors=errors,
        confusion={k: dict(v) for k, v in sorted(confusion.items())},
    )
