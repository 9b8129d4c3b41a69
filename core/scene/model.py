"""The scene: shared memory of a conversation, made of hyperlexemes, links and a field.

This module holds the data model, its operations (apply a delta, diff two scenes), its
canonical JSON form and the compact prompt rendering. Pure Python (no torch), so routers
and plugins can use it cheaply.

Provenance: ``Scene.apply`` takes the ``speaker`` of the utterance (``USER``, or the persona
that said it). Each hyperlexeme keeps who said it (``said_by``) and each link who asserted it
(``said_by``, ``turn``). The user's facts outrank a persona's elaborations: a persona's
mentions bump salience by ``elaboration`` x ``bump``, everything the user said ranks before
what only personas said (so it fills the focus and is rendered first), a persona cannot flip
the polarity of a link the user asserted, and the rendering marks a persona's additions
``(by NAME)``. A delta applied without a speaker records no provenance and ranks as a fact,
as before provenance existed.

Salience dynamics: each ``Scene.apply`` multiplies every salience by ``decay`` and adds
``bump`` to the hyperlexemes the delta mentions. A hyperlexeme mentioned every turn
converges to ``bump / (1 - decay)``, which for the defaults (1.0, 0.8) is exactly
``SALIENCE_CAP``; the cap only matters for larger bumps or slower decay, and keeps one
obsessively repeated word from dominating focus forever.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from dataclasses import field as _field
from typing import Any

KINDS = ("entity", "concept", "action", "quality")
USER = "user"
"""The speaker of the user's messages; any other speaker is a persona."""
VIEWS = ("all", "focus", "none")
SALIENCE_CAP = 5.0
"""Highest salience a hyperlexeme can reach (the fixed point of the default bump/decay)."""
LINK_WEIGHT_CAP = 5.0
"""Highest link weight; links do not decay, so without a cap weights would grow forever."""
DIFF_TOLERANCE = 1e-9
"""Float differences (salience, weight, valence, arousal) at or below this are no change."""
_SPACES = re.compile(r"\s+")
_NON_WORD = re.compile(r"\W+")


def canonical_label(text: str) -> str:
    """The key hyperlexemes merge by: lowercase, whitespace collapsed, trimmed."""
    return _SPACES.sub(" ", text.strip().lower())


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
    said_by: list[str] = _field(default_factory=list)  # speakers, in order of first mention

    @property
    def is_fact(self) -> bool:
        """Said by the user (or of unknown provenance), not only elaborated by a persona."""
        return not self.said_by or USER in self.said_by

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
    said_by: str | None = None  # who asserted the current polarity (None: not recorded)
    turn: int | None = None  # and at which turn

    @property
    def is_fact(self) -> bool:
        return self.said_by is None or self.said_by == USER

    def __post_init__(self) -> None:
        if self.polarity not in (1, -1):
            raise ValueError(f"link {self.src}-{self.rel}->{self.dst}: polarity must be 1 or -1")


@dataclass
class SceneField:
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


def slugify(label: str) -> str:
    """A scene id for ``label``: its canonical form with runs of non-word characters as ``_``.

    ``"Old  Man"`` gives ``"old_man"``; a label with no word characters gives ``"h"``.
    """
    return _NON_WORD.sub("_", canonical_label(label)).strip("_") or "h"


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate, about four characters per token (rounded up)."""
    return math.ceil(len(text) / 4)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, float(value)))


def _union(first: Iterable[str], second: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*first, *second]))


def _attrs_text(attrs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(attrs.items()))


def _rank_key(hx: Hyperlexeme) -> tuple[bool, float, float, str, str]:
    turn = -math.inf if hx.source_turn is None else hx.source_turn
    return (not hx.is_fact, -hx.salience, -turn, canonical_label(hx.label), hx.id)


def _by(speakers: Iterable[str]) -> str:
    """The mark of a persona's addition in a rendering: `` (by poet)``."""
    names = [s for s in speakers if s != USER]
    return f" (by {'/'.join(names)})" if names else ""


def _link_text(link: Link, labels: dict[str, str]) -> str:
    neg = "NOT " if link.polarity < 0 else ""
    src, dst = labels.get(link.src, link.src), labels.get(link.dst, link.dst)
    mark = "" if link.is_fact else _by([link.said_by or ""])
    return f"{src} {neg}{link.rel} {dst}{mark}"


_FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SceneField)}
_FIELD_STRINGS = ("emotion", "tempo", "line_length", "tone")


def _collapse(delta: Delta) -> tuple[dict[str, Hyperlexeme], dict[str, str]]:
    """The delta's hyperlexemes merged by canonical label, and each delta id's label.

    An utterance that names "the sea" twice still mentions it once: attrs merge (later
    wins), associations union, and the first occurrence gives label and kind.
    """
    merged: dict[str, Hyperlexeme] = {}
    canon_of: dict[str, str] = {}
    for hx in delta.hyperlexemes:
        canon = canonical_label(hx.label)
        if not canon:
            raise ValueError(f"delta hyperlexeme {hx.id!r} has an empty label")
        if canon_of.setdefault(hx.id, canon) != canon:
            raise ValueError(
                f"delta id {hx.id!r} names two hyperlexemes: {canon_of[hx.id]!r} and {canon!r}"
            )
        if canon in merged:
            seen = merged[canon]
            seen.attrs.update(copy.deepcopy(hx.attrs))
            seen.associations = _union(seen.associations, hx.associations)
        else:
            merged[canon] = Hyperlexeme(
                id=hx.id,
                label=_SPACES.sub(" ", hx.label.strip()),
                kind=hx.kind,
                attrs=copy.deepcopy(hx.attrs),
                associations=_union(hx.associations, ()),
            )
    return merged, canon_of


def _check_speaker(speaker: str | None, elaboration: float) -> None:
    if speaker is not None and (not isinstance(speaker, str) or not speaker.strip()):
        raise ValueError(f"speaker must be a non-empty name or None, got {speaker!r}")
    if not 0 < elaboration <= 1:
        raise ValueError(f"elaboration must be in (0, 1], got {elaboration!r}")


def _check_apply_args(
    bump: float, decay: float, focus_size: int, field_weight: float, floor: float
) -> None:
    if not bump > 0:
        raise ValueError(f"bump must be > 0, got {bump!r}")
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    if focus_size < 0:
        raise ValueError(f"focus_size must be >= 0, got {focus_size!r}")
    if not 0 <= field_weight <= 1:
        raise ValueError(f"field_weight must be in [0, 1], got {field_weight!r}")
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor!r}")


@dataclass
class Scene:
    """Hyperlexemes (by scene id), links between them, the field, the focus and a version.

    Scenes built by ``apply`` keep these invariants: no link has an endpoint missing from
    ``hyperlexemes``; canonical labels are unique; salience is in ``(0, SALIENCE_CAP]``;
    ``links`` are in canonical order (so ``from_json(to_json(s)) == s``); ``focus`` is the
    top of ``ranked()``.
    """

    hyperlexemes: dict[str, Hyperlexeme] = _field(default_factory=dict)
    links: list[Link] = _field(default_factory=list)
    field: SceneField = _field(default_factory=SceneField)
    focus: list[str] = _field(default_factory=list)
    version: int = 0

    @property
    def empty(self) -> bool:
        return not self.hyperlexemes and not self.links

    def ranked(self, ids: Iterable[str] | None = None) -> list[str]:
        """Ids (default: all) most salient first.

        Ties go to the most recent ``source_turn`` (None counts as oldest), then the
        canonical label, then the id, so the order never depends on dict order.
        Unknown ids are skipped.
        """
        pool = self.hyperlexemes if ids is None else dict.fromkeys(ids)
        hxs = [self.hyperlexemes[i] for i in pool if i in self.hyperlexemes]
        return [hx.id for hx in sorted(hxs, key=_rank_key)]

    def apply(
        self,
        delta: Delta,
        turn: int | None = None,
        *,
        bump: float = 1.0,
        decay: float = 0.8,
        focus_size: int = 5,
        field_weight: float = 0.5,
        floor: float = 0.05,
        speaker: str | None = None,
        elaboration: float = 0.5,
    ) -> Scene:
        """The scene after ``delta`` (one utterance, at ``turn``, said by ``speaker``);
        neither input is mutated.

        - Every existing salience is multiplied by ``decay``. One that falls below
          ``floor`` is forgotten, unless a link references it: then it is kept, resting at
          ``floor``, so links never dangle and relations outlive the words' salience.
        - Delta hyperlexemes merge with the scene's by canonical label (several in one
          delta count as one mention): salience ``decayed + bump`` (capped at
          ``SALIENCE_CAP``), attrs merged with the delta winning, associations unioned;
          label, kind and ``source_turn`` (the first mention) stay. New ones get an id
          slugified from the label (``"old_man"``, then ``"old_man_2"`` if taken),
          salience ``bump`` and ``source_turn = turn``.
        - Delta links are remapped to scene ids and keyed by (src, canonical rel, dst); the
          last one in the delta wins. An existing link with that key takes the delta's
          polarity; its weight grows by ``bump`` (capped at ``LINK_WEIGHT_CAP``) when the
          polarity is confirmed and restarts at ``bump`` when it flips, since the old
          evidence was for the opposite claim. New links get weight ``bump``. Delta link
          weights are ignored (the delta's JSON form does not carry them). Links are never
          decayed or forgotten.
        - Valence and arousal move ``field_weight`` of the way toward the delta field's,
          clamped to [-1, 1] and [0, 1]; its emotion, tempo, line length and tone replace
          the scene's unless they are the defaults (an encoder's "no reading").
        - Provenance (with a ``speaker``): each mentioned hyperlexeme adds the speaker to its
          ``said_by``; a link takes the speaker and turn that asserted its polarity. A
          persona's mentions bump by ``elaboration * bump``; a persona restating a user's
          link leaves it the user's, and one contradicting it is ignored: only the user
          changes the user's facts.
        - ``focus`` becomes the first ``focus_size`` of ``ranked()`` (the user's facts first).

        Raises ValueError for a delta link whose endpoint is not a delta id, an empty
        label or rel, a delta id reused for two labels, or out-of-range arguments.
        """
        _check_apply_args(bump, decay, focus_size, field_weight, floor)
        _check_speaker(speaker, elaboration)
        persona_speaks = speaker is not None and speaker != USER
        mention = bump * elaboration if persona_speaks else bump
        incoming, canon_of = _collapse(delta)

        hxs: dict[str, Hyperlexeme] = {}
        by_label: dict[str, str] = {}
        for hid in sorted(self.hyperlexemes):
            old = self.hyperlexemes[hid]
            hxs[hid] = Hyperlexeme(
                id=hid,
                label=old.label,
                kind=old.kind,
                attrs=copy.deepcopy(old.attrs),
                salience=float(min(old.salience * decay, SALIENCE_CAP)),
                associations=list(old.associations),
                source_turn=old.source_turn,
                said_by=list(old.said_by),
            )
            by_label.setdefault(canonical_label(old.label), hid)

        taken = set(self.hyperlexemes)
        scene_id: dict[str, str] = {}
        mentioned: set[str] = set()
        for canon, new in incoming.items():
            sid = by_label.get(canon)
            if sid is None:
                sid = base = slugify(canon)
                suffix = 2
                while sid in taken:
                    sid, suffix = f"{base}_{suffix}", suffix + 1
                taken.add(sid)
                by_label[canon] = sid
                hxs[sid] = Hyperlexeme(
                    id=sid,
                    label=new.label,
                    kind=new.kind,
                    attrs=new.attrs,
                    salience=float(min(mention, SALIENCE_CAP)),
                    associations=new.associations,
                    source_turn=turn,
                )
            else:
                hx = hxs[sid]
                hx.salience = float(min(hx.salience + mention, SALIENCE_CAP))
                hx.attrs = {**hx.attrs, **new.attrs}
                hx.associations = _union(hx.associations, new.associations)
                if hx.source_turn is None:
                    hx.source_turn = turn
            if speaker is not None and speaker not in hxs[sid].said_by:
                hxs[sid].said_by.append(speaker)
            mentioned.add(sid)
            scene_id[canon] = sid

        links = [
            Link(k.src, k.rel, k.dst, k.polarity, k.weight, k.said_by, k.turn)
            for k in self.links
            if k.src in self.hyperlexemes and k.dst in self.hyperlexemes
        ]
        existing: dict[tuple[str, str, str], list[Link]] = {}
        for link in links:
            existing.setdefault((link.src, canonical_label(link.rel), link.dst), []).append(link)
        said: dict[tuple[str, str, str], Link] = {}
        for k in delta.links:
            missing = [i for i in (k.src, k.dst) if i not in canon_of]
            if missing:
                raise ValueError(
                    f"delta link {k.src} -{k.rel}-> {k.dst}: unknown id(s) {', '.join(missing)}"
                )
            rel = canonical_label(k.rel)
            if not rel:
                raise ValueError(f"delta link {k.src} -{k.rel!r}-> {k.dst}: empty rel")
            src, dst = scene_id[canon_of[k.src]], scene_id[canon_of[k.dst]]
            said[(src, rel, dst)] = Link(src, _SPACES.sub(" ", k.rel.strip()), dst, k.polarity,
                                         said_by=speaker, turn=turn if speaker else None)
        for key, new_link in said.items():
            for link in existing.get(key, []):
                confirmed = link.polarity == new_link.polarity
                users = link.said_by == USER and persona_speaks
                if users and not confirmed:
                    continue  # a persona does not overrule the user's fact
                weight = link.weight + bump if confirmed else bump
                link.polarity, link.weight = new_link.polarity, float(min(weight, LINK_WEIGHT_CAP))
                if speaker is not None and not users:
                    link.said_by, link.turn = speaker, turn
            if key not in existing:
                new_link.weight = float(min(bump, LINK_WEIGHT_CAP))
                links.append(new_link)
        links.sort(key=lambda k: (k.src, k.rel, k.dst, k.polarity))

        linked = {k.src for k in links} | {k.dst for k in links}
        for hid in list(hxs):
            if hid in mentioned or hxs[hid].salience >= floor:
                continue
            if hid in linked:
                hxs[hid].salience = float(floor)
            else:
                del hxs[hid]

        new_field = SceneField(**asdict(self.field))
        if delta.field is not None:
            theirs, keep = delta.field, 1 - field_weight
            new_field.valence = keep * new_field.valence + field_weight * theirs.valence
            new_field.arousal = keep * new_field.arousal + field_weight * theirs.arousal
            for name in _FIELD_STRINGS:
                value = getattr(theirs, name)
                if value != _FIELD_DEFAULTS[name]:
                    setattr(new_field, name, value)
        new_field.valence = _clamp(new_field.valence, -1.0, 1.0)
        new_field.arousal = _clamp(new_field.arousal, 0.0, 1.0)

        scene = Scene(hyperlexemes=hxs, links=links, field=new_field, version=self.version + 1)
        scene.focus = scene.ranked()[:focus_size]
        return scene

    def diff(self, other: Scene) -> SceneDiff:
        """What changed from this scene to ``other`` (version ignored).

        Links are compared by (src, rel, dst, polarity), so a polarity flip is one link
        removed and one added; a weight change alone is a changed link.
        """
        labels = {hid: hx.label for hid, hx in self.hyperlexemes.items()}
        labels.update({hid: hx.label for hid, hx in other.hyperlexemes.items()})
        mine, theirs = self.hyperlexemes, other.hyperlexemes
        result = SceneDiff(
            added=sorted(theirs.keys() - mine.keys()),
            removed=sorted(mine.keys() - theirs.keys()),
            changed=sorted(
                hid for hid in mine.keys() & theirs.keys() if _hx_differs(mine[hid], theirs[hid])
            ),
            labels=labels,
        )
        _diff_links(self.links, other.links, result)
        for f in fields(SceneField):
            old, new = getattr(self.field, f.name), getattr(other.field, f.name)
            numeric = f.name not in _FIELD_STRINGS
            if (abs(old - new) > DIFF_TOLERANCE) if numeric else old != new:
                result.field_changes[f.name] = (old, new)
        if list(self.focus) != list(other.focus):
            result.focus_change = (list(self.focus), list(other.focus))
        return result

    def render(
        self,
        view: str = "all",
        max_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> str:
        """Compact, token-cheap text for a prompt. ``view`` is ``all``, ``focus`` or ``none``.

        First line ``label[attrs]; label; ...``, the user's facts first, then by salience;
        then one ``src [NOT ]rel dst`` line per link whose endpoints are both shown, the
        user's first. A persona's additions end in ``(by NAME)``. With
        ``max_tokens``, the least salient hyperlexemes (and their links) are dropped until
        ``count_tokens`` (default ``estimate_tokens``) is within budget; "" if none fits.
        """
        if view not in VIEWS:
            raise ValueError(f"scene view must be one of {', '.join(VIEWS)}, got {view!r}")
        if view == "none":
            return ""
        ids = self.ranked(None if view == "all" else self.focus)
        if max_tokens is None:
            return self._render_ids(ids)
        count = count_tokens or estimate_tokens
        if max_tokens <= 0 or not ids:
            return ""
        text = self._render_ids(ids)
        if count(text) <= max_tokens:
            return text
        fits, best, too_many = "", 0, len(ids)
        while too_many - best > 1:
            mid = (best + too_many) // 2
            text = self._render_ids(ids[:mid])
            if count(text) <= max_tokens:
                fits, best = text, mid
            else:
                too_many = mid
        return fits

    def _render_ids(self, ids: list[str]) -> str:
        if not ids:
            return ""
        rank = {hid: i for i, hid in enumerate(ids)}
        parts = []
        for hid in ids:
            hx = self.hyperlexemes[hid]
            attrs = _attrs_text(hx.attrs)
            mark = "" if hx.is_fact else _by(hx.said_by)
            parts.append((f"{hx.label}[{attrs}]" if attrs else hx.label) + mark)
        shown = sorted(
            (k for k in self.links if k.src in rank and k.dst in rank),
            key=lambda k: (not k.is_fact, rank[k.src], rank[k.dst], canonical_label(k.rel),
                           k.polarity),
        )
        labels = {hid: self.hyperlexemes[hid].label for hid in ids}
        return "\n".join(["; ".join(parts), *(_link_text(k, labels) for k in shown)])

    def table_rows(self) -> list[tuple[str, str, float, str, str, str]]:
        """(label, kind, salience, attrs, "focus" or "", said by) per hyperlexeme, ordered as
        rendered; "said by" is the speakers with the first turn (``user@1, poet``)."""
        focus = set(self.focus)
        rows = []
        for hid in self.ranked():
            hx = self.hyperlexemes[hid]
            mark = "focus" if hid in focus else ""
            rows.append((hx.label, hx.kind, hx.salience, _attrs_text(hx.attrs), mark,
                         provenance(hx.said_by, hx.source_turn)))
        return rows

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
            field=SceneField(**data.get("field", {})),
            focus=list(data.get("focus", [])),
            version=int(data.get("version", 0)),
        )

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))


@dataclass
class Delta:
    """What one utterance adds to a scene: the output of a scene encoder.

    Ids are local to the delta (links refer to them); applying the delta to a scene maps
    each hyperlexeme to the scene's one with the same canonical label, or adds it.
    ``field`` is None when the encoder read no emotion or rhythm from the text.
    """

    hyperlexemes: list[Hyperlexeme] = _field(default_factory=list)
    links: list[Link] = _field(default_factory=list)
    field: SceneField | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hyperlexemes": [
                {"id": h.id, "label": h.label, "kind": h.kind, "attrs": h.attrs}
                for h in self.hyperlexemes
            ],
            "links": [
                {"src": k.src, "rel": k.rel, "dst": k.dst, "polarity": k.polarity}
                for k in self.links
            ],
            "field": None if self.field is None else asdict(self.field),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Delta:
        return cls(
            hyperlexemes=[Hyperlexeme(**h) for h in data.get("hyperlexemes", [])],
            links=[Link(**link) for link in data.get("links", [])],
            field=None if data.get("field") is None else SceneField(**data["field"]),
        )


def opening_scene(delta: Delta) -> Scene:
    """The scene of a conversation whose first message, the user's, read as ``delta``."""
    return Scene().apply(delta, turn=0, speaker=USER)


def provenance(speakers: Iterable[str], turn: int | None) -> str:
    """Who said it and when, for people: ``user@1, poet`` (the first speaker with the turn);
    "" when not recorded."""
    names = list(speakers)
    if not names:
        return ""
    first = names[0] if turn is None else f"{names[0]}@{turn}"
    return ", ".join([first, *names[1:]])


def _hx_differs(a: Hyperlexeme, b: Hyperlexeme) -> bool:
    fixed = ("label", "kind", "attrs", "associations", "source_turn", "said_by")
    if any(getattr(a, name) != getattr(b, name) for name in fixed):
        return True
    return abs(a.salience - b.salience) > DIFF_TOLERANCE


def _diff_links(old: list[Link], new: list[Link], into: SceneDiff) -> None:
    """Match links as multisets per (src, rel, dst, polarity), weights within tolerance."""
    groups: dict[tuple[str, str, str, int], tuple[list[Link], list[Link]]] = {}
    for side, links in ((0, old), (1, new)):
        for link in links:
            key = (link.src, link.rel, link.dst, link.polarity)
            groups.setdefault(key, ([], []))[side].append(link)
    for key in sorted(groups):
        olds, news = (sorted(side, key=lambda k: k.weight) for side in groups[key])
        unmatched: list[Link] = []
        for link in olds:
            same = next(
                (i for i, n in enumerate(news) if abs(n.weight - link.weight) <= DIFF_TOLERANCE),
                None,
            )
            if same is None:
                unmatched.append(link)
            else:
                del news[same]
        pairs = min(len(unmatched), len(news))
        into.links_changed.extend(zip(unmatched[:pairs], news[:pairs], strict=True))
        into.links_removed.extend(unmatched[pairs:])
        into.links_added.extend(news[pairs:])


@dataclass
class SceneDiff:
    """The difference between two scenes, as returned by ``Scene.diff``.

    ``added``/``removed``/``changed`` are hyperlexeme ids; ``links_changed`` pairs a link
    whose weight alone changed (old, new); ``field_changes`` maps a field name to
    (old, new); ``focus_change`` is (old, new) when the focus list differs. ``labels``
    (id to label, from both scenes) is only for display.
    """

    added: list[str] = _field(default_factory=list)
    removed: list[str] = _field(default_factory=list)
    changed: list[str] = _field(default_factory=list)
    links_added: list[Link] = _field(default_factory=list)
    links_removed: list[Link] = _field(default_factory=list)
    links_changed: list[tuple[Link, Link]] = _field(default_factory=list)
    field_changes: dict[str, tuple[Any, Any]] = _field(default_factory=dict)
    focus_change: tuple[list[str], list[str]] | None = None
    labels: dict[str, str] = _field(default_factory=dict, repr=False, compare=False)

    @property
    def empty(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.changed
            or self.links_added
            or self.links_removed
            or self.links_changed
            or self.field_changes
            or self.focus_change is not None
        )

    def to_dict(self) -> dict[str, Any]:
        mentioned = {*self.added, *self.removed, *self.changed}
        for link in (*self.links_added, *self.links_removed):
            mentioned.update((link.src, link.dst))
        for old, _ in self.links_changed:
            mentioned.update((old.src, old.dst))
        if self.focus_change is not None:
            mentioned.update((*self.focus_change[0], *self.focus_change[1]))
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "links_added": [asdict(k) for k in self.links_added],
            "links_removed": [asdict(k) for k in self.links_removed],
            "links_changed": [[asdict(o), asdict(n)] for o, n in self.links_changed],
            "field_changes": {k: [o, n] for k, (o, n) in self.field_changes.items()},
            "focus": None if self.focus_change is None else [list(f) for f in self.focus_change],
            "labels": {i: self.labels[i] for i in sorted(mentioned) if i in self.labels},
        }

    def render(self) -> str:
        """Short human text, one change a line: ``+ cat``, ``- mat``, ``~ sea``,
        ``+ cat NOT on mat``, ``valence: +0.00 -> -0.40``; "" when nothing changed."""
        labels = self.labels
        lines = [f"+ {labels.get(i, i)}" for i in self.added]
        lines += [f"- {labels.get(i, i)}" for i in self.removed]
        lines += [f"~ {labels.get(i, i)}" for i in self.changed]
        lines += [f"+ {_link_text(k, labels)}" for k in self.links_added]
        lines += [f"- {_link_text(k, labels)}" for k in self.links_removed]
        lines += [
            f"~ {_link_text(n, labels)} (weight {o.weight:.2f} -> {n.weight:.2f})"
            for o, n in self.links_changed
        ]
        for name, (old, new) in self.field_changes.items():
            if name == "valence":
                lines.append(f"valence: {old:+.2f} -> {new:+.2f}")
            elif name == "arousal":
                lines.append(f"arousal: {old:.2f} -> {new:.2f}")
            else:
                lines.append(f"{name}: {old} -> {new}")
        if self.focus_change is not None:
            old_focus, new_focus = (
                ", ".join(labels.get(i, i) for i in side) or "(none)" for side in self.focus_change
            )
            lines.append(f"focus: {old_focus} -> {new_focus}")
        return "\n".join(lines)
