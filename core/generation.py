"""Generation parameters: one validated set shared by persona contracts, ``-o`` and the API."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

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
    return None


def parse_options(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Check ``-o key value`` pairs from the command line, converting each value."""
    return {key: _check(key, value, "-o") for key, value in pairs}
