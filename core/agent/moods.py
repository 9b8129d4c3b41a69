"""Mood layers by name: ``NAME`` or ``NAME:WEIGHT``, checked the same way for ``agent chat
--mood``, ``/mood``, the server's ``mood`` field and LangChain's ``mood``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hyperlex.errors import HyperlexError, UnknownPersona


def parse_mood(moods: Mapping[str, Any], spec: str | None) -> tuple[str, float] | None:
    """``NAME`` or ``NAME:WEIGHT`` (weight in (0, 2], default 1) -> (name, weight); None,
    "off" or "none" -> None. Unknown moods and bad weights are a :class:`HyperlexError`."""
    if spec is None or spec in ("off", "none"):
        return None
    name, _, weight_text = str(spec).partition(":")
    if name not in moods:
        raise UnknownPersona(name, list(moods), kind="mood")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise HyperlexError(f"mood weight in {spec!r} must be a number") from None
    if not 0.0 < weight <= 2.0:
        raise HyperlexError(f"mood weight in {spec!r} must be in (0, 2]")
    return name, weight


def mood_label(mood: tuple[str, float] | None) -> str | None:
    if mood is None:
        return None
    name, weight = mood
    return name if weight == 1.0 else f"{name}:{weight:g}"
