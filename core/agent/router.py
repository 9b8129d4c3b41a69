"""Routing: who answers each turn, and why.

:class:`TurnRouter` applies the order: a pinned persona (``--persona``, ``/persona NAME``); an
``@name`` address at the start of the message; a request in words; a plugin's ``route_turn``
answer; the automatic router; then the persona of the previous turn and finally the default.
Every decision carries its source, reason and scores. It needs no language model, so
``agent route`` answers in about a second.

- :func:`requested_persona` reads a request in words ("let the poet answer: ...",
  "switch to the scientist", "as a logician, ...") with a few patterns over the installed
  persona names. Requests are certain, so they are never second-guessed by a score.
- :class:`EmbeddingRouter`, the automatic router, scores every persona on the message (and on
  the scene's focus) against its description, routing examples and keywords with sentence
  embeddings. The best persona wins when nobody spoke yet; afterwards the current
  persona keeps the turn unless another beats it by ``margin`` (hysteresis), so follow-ups
  such as "go on" or "why?" never flap between personas.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hyperlex.engines.embeddings import Embed, minilm_embedder
from hyperlex.errors import HyperlexError

DEFAULT_PERSONA = "philosopher"
DEFAULT_ROUTER = "embedding"
_ADDRESS = re.compile(r"^@([a-z][a-z0-9_-]*)(?:[\s,:]+(.*))?$", re.DOTALL)

if TYPE_CHECKING:
    from hyperlex.host import Host
    from hyperlex.persona.bundle import Persona
    from hyperlex.scene.model import Scene


@dataclass
class RouteDecision:
    """Who answers, why, and the text that persona receives (any request phrase removed)."""

    persona: str
    source: str  # pinned | address | request | hook | router | current | default
    reason: str
    message: str
    scores: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "persona": self.persona,
            "source": self.source,
            "reason": self.reason,
            "message": self.message,
            "confidence": None if self.confidence is None else round(self.confidence, 4),
            "scores": {name: round(score, 4) for name, score in self.scores.items()},
        }


# --- requests in words ------------------------------------------------------------------------

_THE = r"(?:the\s+|a\s+|an\s+|our\s+|your\s+|my\s+)?"
_END = r"(?:[\s,:;.!?-]+|$)"
_ASK_VERBS = (r"answer|respond|reply|take\s+(?:this|it|that|over)(?:\s+one)?|speak|handle|try|"
              r"field|weigh\s+in|go|have\s+a\s+go|chime\s+in|say|explain|tell|write|describe")
_OBJECT = r"(?:\s+(?:this|it|that)(?:\s+(?:one|question))?|\s+(?:on|about))?"
_REQUEST_PATTERNS = [
    # "let the poet answer: ...", "have the scientist explain why ..."
    rf"^(?:please\s+)?(?:let|have|get)\s+{_THE}{{name}}\s+(?:{_ASK_VERBS})\b{_OBJECT}{_END}",
    # "switch to the scientist", "hand it over to the logician", "back to the poet, ..."
    r"^(?:please\s+)?(?:(?:switch|swap|change|go|turn|hand\s+(?:it|this|that)(?:\s+over)?|"
    rf"pass\s+(?:it|this|that)(?:\s+on)?)\s+)?(?:back\s+)?(?:over\s+)?to\s+{_THE}{{name}}{_END}",
    # "as a logician, is this valid: ...", "in the poet's voice: ...", "from the scientist's view"
    rf"^(?:answer\s+|speak\s+|reply\s+)?as\s+{_THE}{{name}}{_END}",
    rf"^(?:in|from|with)\s+{_THE}{{name}}'?s?\s+(?:voice|view|words|eyes|perspective|hat){_END}",
    # "poet, write about ...", "scientist: why is ..."
    r"^{name}\s*[,:]\s*",
    # "ask the scientist why ...", "tell the dreamer about ..."
    rf"^(?:please\s+)?(?:ask|tell|get)\s+{_THE}{{name}}(?:\s+(?:to|about))?{_END}",
    # "I'd like the dreamer to take this one", "I want the poet to answer"
    r"^(?:i(?:'d|\s+would)\s+(?:like|love|prefer)|i\s+want|i'd\s+want)\s+"
    rf"{_THE}{{name}}\s+to\s+(?:{_ASK_VERBS})\b{_OBJECT}{_END}",
    # "can the philosopher weigh in on ...", "could the poet answer this"
    rf"^(?:can|could|would|will)\s+{_THE}{{name}}\s+(?:{_ASK_VERBS})\b{_OBJECT}{_END}",
    # "give me the logician's view on ...", "what's the poet's take on ..."
    r"^(?:give\s+me|i\s+want|i'd\s+like|what(?:'s|\s+is))\s+"
    rf"{_THE}{{name}}'s\s+(?:view|take|answer|opinion|perspective|version)(?:\s+(?:on|of))?{_END}",
]


def requested_persona(message: str, names: Sequence[str]) -> tuple[str, str] | None:
    """``(persona, message without the request phrase)`` when ``message`` asks for a persona in
    words; None otherwise. A bare request ("switch to the poet") keeps the whole message."""
    text = message.strip()
    for name in sorted(names, key=len, reverse=True):
        escaped = re.escape(name).replace(r"\_", "[_ ]").replace(r"\-", "[- ]")
        for pattern in _REQUEST_PATTERNS:
            match = re.match(pattern.format(name=escaped), text, re.IGNORECASE)
            if match:
                rest = text[match.end():].strip()
                return name, _sentence(rest) if _has_content(rest) else text
    return None


def _has_content(text: str) -> bool:
    return len(re.findall(r"[A-Za-z]{2,}", text)) >= 2


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


# --- the automatic router ---------------------------------------------------------------------


# Continuations carry no topic of their own; a message closer to these than to any persona
# stays with the current one.
FOLLOW_UPS = (
    "continue", "say more", "please elaborate", "can you expand on that?", "how so?",
    "really?", "and?", "what happens next?", "go ahead", "one more", "again", "okay, next",
    "I don't understand", "explain that part again", "thanks!", "hmm", "yes", "no",
)


@dataclass
class AutoRoute:
    """What a router returns: its choice (None: keep the current persona), scores, and why."""

    persona: str | None
    reason: str
    scores: dict[str, float]
    confidence: float


class EmbeddingRouter:
    """Scores personas by embedding similarity; see the module docstring for the policy.

    A persona's score is the mean of its two most similar prototypes (description and routing
    examples), plus a small bonus per routing keyword in the message. With a scene focus, the
    message is also compared as "message + focus labels" and the two are blended, so an
    ambiguous message leans toward the persona the conversation is about. ``confidence`` is
    the softmax probability of the best persona at ``temperature``.
    """

    def __init__(
        self,
        embed: Embed | None = None,
        *,
        threshold: float = 0.35,
        margin: float = 0.08,
        temperature: float = 0.05,
        focus_weight: float = 0.25,
        keyword_bonus: float = 0.03,
        follow_ups: Sequence[str] = FOLLOW_UPS,
    ):
        self._embed = embed
        self.follow_ups = tuple(follow_ups)
        self.threshold = threshold
        self.margin = margin
        self.temperature = temperature
        self.focus_weight = focus_weight
        self.keyword_bonus = keyword_bonus
        self._prototypes: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> Any:
        with self._lock:
            if self._embed is None:
                self._embed = minilm_embedder()
        return self._embed(texts)

    def _prototype(self, persona: Persona) -> Any:
        return self._vectors(persona.name, (persona.description, *persona.examples))

    def _vectors(self, name: str, texts: tuple[str, ...]) -> Any:
        key = (name, texts)
        if key not in self._prototypes:
            self._prototypes[key] = self.embed(list(texts))
        return self._prototypes[key]

    def follow_up_score(self, message: str) -> float:
        """How much ``message`` reads like a topic-free continuation (mean of the two most
        similar continuation phrases)."""
        if not self.follow_ups:
            return float("-inf")
        return _top2(self._vectors(" follow-ups", self.follow_ups) @ self.embed([message])[0])

    def scores(self, message: str, personas: Mapping[str, Persona],
               scene: Scene | None = None) -> dict[str, float]:
        focus = _focus_text(scene)
        queries = [message] + ([f"{message} ({focus})"] if focus else [])
        vectors = self.embed(queries)
        text = " " + " ".join(re.findall(r"[a-z0-9']+", message.lower())) + " "
        result = {}
        for name, persona in sorted(personas.items()):
            score = _top2(self._prototype(persona) @ vectors[0])
            if focus:
                focus_score = _top2(self._prototype(persona) @ vectors[1])
                score = (1 - self.focus_weight) * score + self.focus_weight * focus_score
            hits = sum(1 for k in persona.keywords
                       if f" {' '.join(re.findall(r'[a-z0-9]+', k.lower()))} " in text)
            result[name] = score + self.keyword_bonus * min(hits, 3)
        return result

    def __call__(self, message: str, scene: Scene | None, personas: Mapping[str, Persona],
                 current: str | None) -> AutoRoute:
        scores = self.scores(message, personas, scene)
        if not scores:
            return AutoRoute(None, "no personas to score", {}, 0.0)
        best = max(scores, key=lambda n: (scores[n], n == current))
        confidence = _softmax(scores, self.temperature)[best]
        top = f"{best} {scores[best]:.2f}, confidence {confidence:.2f}"
        if current is None or current not in scores:
            return AutoRoute(best, f"router: best match ({top})", scores, confidence)
        if best == current:
            return AutoRoute(current, f"router: current persona is the best match ({top})",
                             scores, confidence)
        follow_up = self.follow_up_score(message)
        if follow_up >= scores[best]:
            return AutoRoute(current, f"router: kept {current} (a follow-up: {follow_up:.2f} "
                             f"against best {top})", scores, confidence)
        lead = scores[best] - scores[current]
        if confidence >= self.threshold and lead >= self.margin:
            return AutoRoute(best, f"router: {best} clearly fits better than {current} "
                             f"({top}; lead {lead:.2f} >= {self.margin:.2f})", scores, confidence)
        return AutoRoute(current, f"router: kept {current} (best {top}; lead {lead:.2f} < "
                         f"{self.margin:.2f} or confidence < {self.threshold:.2f})",
                         scores, confidence)


def _top2(similarities: Any) -> float:
    best = sorted((float(v) for v in similarities), reverse=True)[:2]
    return sum(best) / len(best)


def _focus_text(scene: Scene | None) -> str:
    if scene is None:
        return ""
    return ", ".join(scene.hyperlexemes[i].label for i in scene.focus if i in scene.hyperlexemes)


def _softmax(scores: Mapping[str, float], temperature: float) -> dict[str, float]:
    top = max(scores.values())
    weights = {n: math.exp((s - top) / temperature) for n, s in scores.items()}
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items()}


def check_router(host: Host, name: str | None) -> None:
    """Refuse a router ``name`` no plugin registered (None or "none": no automatic router)."""
    if name not in (None, "none") and name not in host.routers:
        known = ", ".join(sorted(host.routers)) or "none"
        raise HyperlexError(f"unknown router {name!r}; registered routers: {known}")


class TurnRouter:
    """The routing order over one set of personas; ``router`` names a registered automatic
    router (None: none, so unaddressed turns stay with the current persona). The default
    router is used when its plugin is loaded and quietly skipped when it is not."""

    def __init__(self, host: Host, personas: Mapping[str, Persona],
                 router: str | None = DEFAULT_ROUTER):
        if router == DEFAULT_ROUTER and router not in host.routers:
            router = None
        check_router(host, router)
        self.host = host
        self.personas = personas
        self.router = router

    def decide(self, message: str, scene: Scene | None = None, current: str | None = None,
               pinned: str | None = None) -> RouteDecision:
        names = sorted(self.personas)
        if not names:
            raise HyperlexError("no personas are installed")
        if pinned:
            return RouteDecision(pinned, "pinned", f"pinned to {pinned}", message)
        text = message.strip()
        match = _ADDRESS.match(text)
        if match and match.group(1) in self.personas:
            name, rest = match.group(1), (match.group(2) or "").strip()
            return RouteDecision(name, "address", f"addressed as @{name}", rest or text)
        requested = requested_persona(text, names)
        if requested:
            name, rest = requested
            return RouteDecision(name, "request", f"asked for the {name} in words", rest)
        chosen = self.host.route_turn(message, scene, self.personas, current)
        if chosen:
            return RouteDecision(chosen[0], "hook",
                                 f"route_turn hook of plugin {chosen[1]!r}", message)
        auto = self._auto(message, scene, current)
        if auto is not None:
            return auto
        if current in self.personas:
            return RouteDecision(current, "current", "continuing with the current persona",
                                 message)
        default = DEFAULT_PERSONA if DEFAULT_PERSONA in self.personas else names[0]
        return RouteDecision(default, "default", "default persona", message)

    def _auto(self, message: str, scene: Scene | None, current: str | None
              ) -> RouteDecision | None:
        if self.router is None:
            return None
        try:
            result = self.host.routers[self.router](message, scene, self.personas, current)
        except Exception as exc:  # a broken router must not cost the user the turn
            self.host.report(f"router {self.router!r} failed: {type(exc).__name__}: {exc}")
            return None
        if result is None or result.persona is None:
            return None
        if result.persona not in self.personas:
            self.host.report(f"router {self.router!r} chose unknown persona {result.persona!r}")
            return None
        return RouteDecision(result.persona, "router", result.reason, message,
                             dict(result.scores), result.confidence)
