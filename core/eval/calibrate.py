"""How strongly should a persona's adapter act? (``agent eval calibrate``)

The adapter's scale multiplies its LoRA update (PEFT's ``scaling``, alpha / r): 1.0 is the
adapter as trained, 0.5 half its effect, 1.5 half as much again. For each scale of a sweep
the persona answers its held-out prompts (greedy, the contract as system message) and three
numbers are measured:

- fidelity: the share of those replies that the fidelity classifier (fitted on every
  persona's training replies, as ``agent eval fidelity`` does) attributes to this persona;
- held-out NLL: the mean negative log-likelihood per token of the persona's held-out
  reference replies;
- neutral perplexity ratio: the perplexity of neutral prose with the adapter active over the
  bare base's (``exp(mean NLL adapter - mean NLL base)``).

The recommendation is the scale with the highest fidelity among those whose neutral
perplexity stays within ``bound`` (1.10: 10%) of the base; ties go to the scale closer to
1.0, then to the lower held-out NLL. When no scale stays within the bound the report says
so and points at the scale with the lowest neutral perplexity instead; ``--write`` refuses
to record such a recommendation. The bundle's ``scale`` field records an accepted value and
the engine applies it whenever the adapter is attached.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hyperlex.errors import HyperlexError
from hyperlex.eval.batched import generate_replies
from hyperlex.eval.fidelity import (
    TARGETS,
    Features,
    PersonaClassifier,
    evaluation_params,
    neutral_text,
    persona_messages,
)
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import BUNDLE_FILE, Persona, check_scale, read_bundle_yaml
from hyperlex.training.data import Example

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
PPL_BOUND = TARGETS["neutral_ppl_ratio"]


@dataclass(frozen=True)
class ScalePoint:
    """What one scale of the sweep measured."""

    scale: float
    hits: int  # held-out replies the classifier attributes to the persona
    replies: int
    nll: float  # mean NLL per token of the held-out reference replies
    ppl_ratio: float  # neutral perplexity with the adapter over the bare base's

    @property
    def fidelity(self) -> float:
        return self.hits / max(self.replies, 1)

    def as_dict(self, bound: float) -> dict[str, Any]:
        return {"scale": self.scale, "fidelity": round(self.fidelity, 4), "hits": self.hits,
                "replies": self.replies, "nll": round(self.nll, 4),
                "neutral_ppl_ratio": round(self.ppl_ratio, 4),
                "within_bound": self.ppl_ratio <= bound}


@dataclass
class CalibrationReport:
    persona: str
    current: float  # the scale the persona's bundle sets
    bound: float
    points: list[ScalePoint]
    recommended: float
    qualified: bool  # whether the recommended scale keeps neutral perplexity within bound
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # scale -> replies

    @property
    def reason(self) -> str:
        within = f"neutral perplexity at most {self.bound:g}x the base's"
        if self.qualified:
            return f"highest fidelity with {within}"
        return (f"no scale keeps {within}: this is the lowest neutral perplexity of the "
                "sweep; not a recommendation to write (try lower scales, or retrain)")

    def as_dict(self) -> dict[str, Any]:
        return {"persona": self.persona, "current_scale": self.current, "bound": self.bound,
                "points": [p.as_dict(self.bound) for p in self.points],
                "recommended": self.recommended, "qualified": self.qualified,
                "reason": self.reason, "samples": self.samples}

    def table(self) -> str:
        """A Markdown table, one row per scale, then the recommendation."""
        lines = ["| scale | fidelity | held-out NLL | neutral ppl x | within bound |",
                 "|---|---|---|---|---|"]
        for p in self.points:
            mark = " **recommended**" if p.scale == self.recommended else ""
            lines.append(f"| {p.scale:g} | {p.fidelity:.2f} ({p.hits}/{p.replies}) | "
                         f"{p.nll:.3f} | {p.ppl_ratio:.3f} | "
                         f"{'yes' if p.ppl_ratio <= self.bound else 'no'}{mark} |")
        lines += ["", f"{self.persona}: recommended scale {self.recommended:g} ({self.reason}); "
                      f"the bundle's scale is {self.current:g}"]
        return "\n".join(lines)


def recommend(points: Sequence[ScalePoint], bound: float = PPL_BOUND) -> tuple[float, bool]:
    """The scale with the highest fidelity among ``points`` whose neutral perplexity ratio is
    at most ``bound`` (ties: closer to 1.0, then lower held-out NLL, then lower scale), and
    True; if none is within the bound, the lowest-perplexity scale and False."""
    if not points:
        raise HyperlexError("nothing to recommend: the sweep has no scales")
    within = [p for p in points if p.ppl_ratio <= bound]
    if within:
        best = max(within, key=lambda p: (p.fidelity, -abs(p.scale - 1.0), -p.nll, -p.scale))
        return best.scale, True
    best = min(points, key=lambda p: (p.ppl_ratio, abs(p.scale - 1.0), p.scale))
    return best.scale, False


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0.5,0.75,1"`` as sorted distinct scales, each in (0, 2]; ``ValueError`` if not."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            number = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number") from None
        try:
            values.append(check_scale(number))
        except ValueError as exc:
            raise ValueError(f"scale {exc}") from None
    if not values:
        raise ValueError("give at least one scale, e.g. 0.5,1,1.5")
    return tuple(sorted(set(values)))


def calibrate(engine: Any, persona: Persona, heldout: Sequence[Example],
              references: dict[str, list[str]], scales: Iterable[float] = DEFAULT_SCALES,
              features: Features | None = None,
              params: GenerationParams | None = None, limit: int | None = None,
              batch_size: int = 16, bound: float = PPL_BOUND,
              progress: Callable[[str], None] | None = None) -> CalibrationReport:
    """Sweep ``persona``'s adapter scale on ``engine`` (a TorchEngine with its adapter
    attached) over its ``heldout`` examples (the first ``limit``); ``references`` are every
    persona's training replies, for the classifier. The engine's scale for the persona is
    restored afterwards. See the module docstring for what is measured and recommended."""
    name = persona.name
    say = progress or (lambda message: None)
    sweep = sorted({check_scale(s) for s in scales})
    examples = list(heldout)[:limit]
    if not sweep:
        raise HyperlexError("calibration needs at least one scale")
    if not examples:
        raise HyperlexError(f"persona {name!r} has no held-out examples to calibrate on")
    if name not in references or len(references) < 2:
        raise HyperlexError(f"calibration needs the training replies of {name!r} and of at "
                            f"least one other persona; got: {', '.join(sorted(references))}")
    if name not in engine.scales:
        engine.set_scale(name, 1.0)  # raises why the persona's adapter is not attached
    params = params or evaluation_params()
    classifier = PersonaClassifier(references, features)
    requests = [(persona_messages(persona, e, engine), name) for e in examples]
    neutral = neutral_text()
    say("scoring neutral text on the bare base")
    base_neutral = _mean(engine.text_nll(t, None) for t in neutral)

    original = engine.scales[name]
    points: list[ScalePoint] = []
    samples: dict[str, list[dict[str, str]]] = {}
    try:
        for scale in sweep:
            engine.set_scale(name, scale)
            replies = generate_replies(
                engine, requests, params, batch_size,
                lambda done, total, scale=scale: say(f"scale {scale:g}: generated {done}/{total}"))
            hits = sum(p == name for p in classifier.predict(replies))
            nll = _mean(engine.reply_nll(m, e.text, name)
                        for (m, _), e in zip(requests, examples, strict=True))
            ratio = math.exp(_mean(engine.text_nll(t, name) for t in neutral) - base_neutral)
            points.append(ScalePoint(scale, hits, len(replies), nll, ratio))
            samples[f"{scale:g}"] = [{"human": e.human, "reply": r}
                                     for e, r in zip(examples[:2], replies, strict=False)]
            say(f"scale {scale:g}: fidelity {hits}/{len(replies)}, held-out NLL {nll:.3f}, "
                f"neutral ppl x {ratio:.3f}")
    finally:
        engine.set_scale(name, original)
    recommended, qualified = recommend(points, bound)
    return CalibrationReport(name, persona.scale, bound, points, recommended, qualified,
                             samples)


def _mean(pairs: Iterable[tuple[float, int]]) -> float:
    """Mean per token of (summed NLL, token count) pairs."""
    total, count = 0.0, 0
    for value, n in pairs:
        total, count = total + value, count + n
    return total / max(count, 1)


# writing the recommendation into the bundle ----------------------------------------------------

_SCALE_LINE = re.compile(r"^scale[ \t]*:.*$", re.MULTILINE)


def check_writable(persona: Persona) -> None:
    """Raise a :class:`HyperlexError` saying why ``persona``'s ``persona.yaml`` cannot be
    rewritten, if it cannot."""
    if persona.root is None:
        raise HyperlexError(f"persona {persona.name!r} is not a directory bundle (a plugin "
                            "registered it as an object), so there is no persona.yaml to write; "
                            "set its scale where it is defined")
    file = persona.root / BUNDLE_FILE
    if not file.is_file():
        raise HyperlexError(f"{file}: missing; cannot record the scale")
    if not os.access(file, os.W_OK) or not os.access(persona.root, os.W_OK):
        raise HyperlexError(f"{file}: not writable; add the line 'scale: VALUE' to it by hand, "
                            "or run from a writable copy of the bundle")


def write_scale(persona: Persona, scale: float) -> str:
    """Record ``scale`` as the ``scale:`` field of ``persona``'s ``persona.yaml``, keeping the
    rest of the file as it is (the line is replaced, or appended). Returns the line written.
    The new file is checked to parse to the same bundle with only ``scale`` changed."""
    check_writable(persona)
    assert persona.root is not None
    value = check_scale(scale)
    file = persona.root / BUNDLE_FILE
    before = read_bundle_yaml(persona.root)
    text = file.read_text(encoding="utf-8")
    line = f"scale: {value}  # set by agent eval calibrate"
    if len(_SCALE_LINE.findall(text)) == 1:
        updated = _SCALE_LINE.sub(line, text)
    else:
        updated = text + ("" if text.endswith("\n") or not text else "\n") + line + "\n"
    import yaml

    after = yaml.safe_load(updated)
    if not isinstance(before, dict) or after != {**before, "scale": value}:
        raise HyperlexError(f"{file}: could not add 'scale: {value}' without changing "
                            "anything else; add it by hand")
    Persona.from_mapping(after, root=persona.root, file=file)  # still a valid bundle
    file.write_text(updated, encoding="utf-8")
    return line
