"""What a generation takes and gives, for every engine: the parameters (one validated set
shared by persona contracts, ``-o`` and the API), the chat messages, and the running
:class:`Generation` with its :class:`Completion`."""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from hyperlex.errors import HyperlexError


class InvalidParameter(HyperlexError):
    pass


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 200
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, values: Mapping[str, Any], where: str = "options") -> GenerationParams:
        """A copy with ``values`` applied; each is checked and converted, naming ``where``."""
        return replace(self, **{k: _check(k, v, where) for k, v in values.items()})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_TYPES: dict[str, type] = {
    f.name: (int if f.name in ("top_k", "max_new_tokens", "seed") else float)
    for f in fields(GenerationParams)
}
KNOWN = tuple(_TYPES)


def _check(key: str, value: Any, where: str) -> Any:
    if key not in _TYPES:
        raise InvalidParameter(
            f"{where}: unknown generation option {key!r}; known options: {', '.join(KNOWN)}"
        )
    kind = _TYPES[key]
    if key == "seed" and (value is None or str(value).lower() == "none"):
        return None
    if isinstance(value, bool):
        raise InvalidParameter(f"{where}: {key} must be a number, got {value!r}")
    try:
        if kind is int:
            converted = int(value)
            if isinstance(value, float) and value != converted:
                raise ValueError
            if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
                raise ValueError
        else:
            converted = float(value)
    except (TypeError, ValueError, OverflowError):
        noun = "an integer" if kind is int else "a number"
        raise InvalidParameter(f"{where}: {key} must be {noun}, got {value!r}") from None
    if not math.isfinite(converted):
        raise InvalidParameter(f"{where}: {key} must be a finite number, got {value!r}")
    problem = _range_problem(key, converted)
    if problem:
        raise InvalidParameter(f"{where}: {key} {problem}, got {value!r}")
    return converted


def _range_problem(key: str, value: float) -> str | None:
    if key == "temperature" and value < 0:
        return "must be >= 0"
    if key == "top_p" and not 0 < value <= 1:
        return "must be in (0, 1]"
    if key == "top_k" and value < 0:
        return "must be >= 0"
    if key == "max_new_tokens" and value < 1:
        return "must be >= 1"
    if key == "repetition_penalty" and value <= 0:
        return "must be > 0"
    if key == "seed" and not 0 <= value < 2**64:
        return "must be between 0 and 2**64 - 1"
    return None


def parse_options(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Check ``-o key value`` pairs from the command line, converting each value."""
    return {key: _check(key, value, "-o") for key, value in pairs}


Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}
Layers = Sequence[tuple[str, float]]  # (mood name, weight) composed over the persona
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Guidance:
    """Scene guidance for a batch of requests (context-aware decoding): each reply is steered
    towards what its prompt says and its ``negatives`` prompt (the same chat without the
    scene, one per request) does not, at ``weight`` (0: no guidance). Only the torch engine
    runs it (:mod:`hyperlex.engines.torch.guidance`)."""

    weight: float
    negatives: Sequence[Sequence[Message]]

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight < 0:
            raise InvalidParameter(f"guidance weight must be a number >= 0, got {self.weight!r}")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    persona: str | None
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


class Generation(ABC):
    """A running generation: iterate it for text pieces; ``cancel()`` stops it early: once
    it has returned, no further piece is yielded (the backend may still be finishing the
    token it was computing).

    After iteration ends, ``text``, ``usage`` and ``finish_reason`` describe the result.
    Stop strings are cut here, for every backend: the text never contains one.
    """

    def __init__(self, persona: str | None, stop: Sequence[str] = ()):
        self.persona = persona
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.usage = Usage()
        self.finish_reason: FinishReason | None = None
        self.seconds = 0.0
        self._cancelled = threading.Event()

    @abstractmethod
    def _pieces(self) -> Iterator[str]:
        """Raw decoded text pieces from the backend, until it finishes or is cancelled."""

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        hold = max((len(s) for s in self.stop), default=1) - 1
        pending = ""
        whole = False  # the caller got the reply to its end (or to a stop string)
        try:
            for piece in self._pieces():
                if self.cancelled:  # nothing reaches the caller after cancel() returned
                    break
                pending += piece
                cut = _first_stop(pending, self.stop)
                if cut is not None:
                    yield from self._emit(pending[:cut])
                    self.finish_reason, whole = "stop", True
                    self.cancel()
                    return
                if len(pending) > hold:
                    ready, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
                    yield from self._emit(ready)
            if not self.cancelled:
                yield from self._emit(pending)
                whole = True
        finally:
            # cancelled before the caller had it all: cancelled, even when the backend had
            # finished generating (a stopped turn is never recorded as a whole one)
            if self.cancelled and not whole:
                self.finish_reason = "cancelled"
            self.cancel()
            self._finish()

    def _emit(self, text: str) -> Iterator[str]:
        if text:
            self.text += text
            yield text

    def _finish(self) -> None:  # noqa: B027 - optional for backends
        """Release backend resources; called once iteration ends for any reason."""

    def complete(self) -> Completion:
        for _ in self:
            pass
        return Completion(
            self.text, self.persona, self.finish_reason or "stop", self.usage, self.seconds
        )


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def finish_reason(tokens: int, limit: int, ended: bool, cancelled: bool = False) -> FinishReason:
    """Why a reply of ``tokens`` new tokens stopped, for every engine alike: cancelled by its
    caller, ended by the model (an end-of-turn token), or cut at ``limit``
    (``max_new_tokens``). A reply shorter than ``limit`` without an end token ended too."""
    if cancelled:
        return "cancelled"
    return "length" if not ended and tokens >= limit else "stop"
