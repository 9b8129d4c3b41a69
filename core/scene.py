"""The scene: shared memory of a conversation, made of hyperlexemes, links and a field.

This module holds the data model, its canonical JSON form and the compact prompt
rendering. Pure Python (no torch), so routers and plugins can use it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from dataclasses import field as _field
from typing import Any

KINDS = ("entity", "concept", "action", "quality")


@dataclass
class Hyperlexeme:
    """A unit of meaning: an entity, concept, action or quality mentioned in the conversation."""

    id: str
    label: str
    kind: str = "concept"
    attrs: dict[str, Any] = _field(default_factory=dict)
    salience: float = 1.0
    associations: list[str] = _field(default_factory=list)
    source_turn: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"hyperlexeme {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )


@dataclass
class Link:
    """A relation between two hyperlexemes; ``polarity`` -1 is a negated relation."""

    src: str
    rel: str
    dst: str
    polarity: int = 1
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.polarity not in (1, -1):
            raise ValueError(f"link {self.src}-{self.rel}->{self.dst}: polarity must be 1 or -1")


@dataclass
class Field:
    """The emotional and rhythmic field the scene lives in."""

    valence: float = 0.0
    arousal: float = 0.0
    emotion: str = "neutral"
    tempo: str = "moderate"
    line_length: str = "medium"
    tone: str = "neutral"

    def __post_init__(self) -> None:
        for name in ("valence", "arousal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"field.{name} must be a number, got {value!r}")
        for name in ("emotion", "tempo", "line_length", "tone"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"field.{name} must be a string, got {getattr(self, name)!r}")

    def render(self) -> str:
        return (
            f"emotion={self.emotion} (valence {self.valence:+.2f}, arousal {self.arousal:.2f}); "
            f"rhythm={self.tempo}, lines {self.line_length}; tone={self.tone}"
        )


@dataclass
class Scene:
    hyperlexemes: dict[str, Hyperlexeme] = _field(default_factory=dict)
    links: list[Link] = _field(default_factory=list)
    field: Field = _field(default_factory=Field)
    focus: list[str] = _field(default_factory=list)
    version: int = 0

    @property
    def empty(self) -> bool:
        return not self.hyperlexemes and not self.links

    def render(self, view: str = "all") -> str:
        """Compact, token-cheap text for a prompt. ``view`` is ``all``, ``focus`` or ``none``."""
        if view == "none" or self.empty:
            return ""
        ids = (
            list(self.hyperlexemes)
            if view == "all"
            else [i for i in self.focus if i in self.hyperlexemes]
        )
        if not ids:
            return ""
        wanted = set(ids)
        parts = []
        for hid in ids:
            hx = self.hyperlexemes[hid]
            attrs = ",".join(f"{k}={v}" for k, v in sorted(hx.attrs.items()))
            parts.append(f"{hx.label}[{attrs}]" if attrs else hx.label)
        lines = ["; ".join(parts)]
        for link in self.links:
            if link.src in wanted and link.dst in wanted:
                neg = "NOT " if link.polarity < 0 else ""
                src, dst = self.hyperlexemes[link.src].label, self.hyperlexemes[link.dst].label
                lines.append(f"{src} {neg}{link.rel} {dst}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "hyperlexemes": [asdict(h) for _, h in sorted(self.hyperlexemes.items())],
            "links": sorted(
                (asdict(link) for link in self.links),
                key=lambda d: (d["src"], d["rel"], d["dst"], d["polarity"]),
            ),
            "field": asdict(self.field),
            "focus": list(self.focus),
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys and items, so equal scenes give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        hxs = [Hyperlexeme(**h) for h in data.get("hyperlexemes", [])]
        return cls(
            hyperlexemes={h.id: h for h in hxs},
            links=[Link(**link) for link in data.get("links", [])],
            field=Field(**data.get("field", {})),
            focus=list(data.get("focus", [])),
            version=int(data.get("version", 0)),
        )

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))
