"""The scene-reader (brief §6.3.1, the input adapter): a LoRA adapter that reads text into a
scene delta, decoded under :data:`READ_SCHEMA` so that every reply parses.

The reader is a persona bundle whose contract asks for the reading, trained on the default
encoder's readings (:func:`reading`) of verified synthetic texts and of the cast's own
sentences (``agent data read``). It is not one of the cast: the built-in encoders plugin
registers a :class:`ReaderEncoder` as the scene encoder ``reader``, which loads its own
engine with the reader alone on first use. Its reading names each hyperlexeme by its label
(links refer to labels), which a 135M model keeps straight more easily than ``h1``,
``h2``...; the field (emotion, rhythm) is left to the default encoder's lexicon.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hyperlex.errors import HyperlexError
from hyperlex.scene.model import Delta, Hyperlexeme, Link

LABEL = {"type": "string", "minLength": 1, "maxLength": 40}
READ_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "hyperlexemes": {"type": "array", "maxItems": 12, "items": {
            "type": "object",
            "properties": {
                "label": LABEL,
                "kind": {"enum": ["entity", "concept", "action", "quality"]},
                "attrs": {"type": "object", "properties": {
                    "quality": {"type": "string", "maxLength": 60},
                    "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "owner": LABEL,
                    "acts": {"type": "string", "maxLength": 60}},
                    "additionalProperties": False}},
            "required": ["label", "kind", "attrs"], "additionalProperties": False}},
        "links": {"type": "array", "maxItems": 12, "items": {
            "type": "object",
            "properties": {"src": LABEL, "rel": LABEL, "dst": LABEL,
                           "polarity": {"enum": [1, -1]}},
            "required": ["src", "rel", "dst", "polarity"], "additionalProperties": False}},
    },
    "required": ["hyperlexemes", "links"], "additionalProperties": False,
}
"""What the reader writes: hyperlexemes by label, and links between labels."""
ATTR_ORDER = ("quality", "count", "owner", "acts")


def reading(delta: Delta) -> str | None:
    """``delta`` as the reader writes it (compact JSON in :data:`READ_SCHEMA`'s key order),
    or None when it does not fit the schema (too many things, an unknown attribute)."""
    labels = {h.id: h.label for h in delta.hyperlexemes}
    things = []
    for h in delta.hyperlexemes:
        if set(h.attrs) - set(ATTR_ORDER):
            return None
        attrs = {k: h.attrs[k] for k in ATTR_ORDER if k in h.attrs}
        things.append({"label": h.label, "kind": h.kind, "attrs": attrs})
    links = [{"src": labels[k.src], "rel": k.rel, "dst": labels[k.dst], "polarity": k.polarity}
             for k in delta.links]
    if not 0 < len(things) <= 12 or len(links) > 12:
        return None
    return json.dumps({"hyperlexemes": things, "links": links}, separators=(",", ":"),
                      ensure_ascii=False)


def delta_from_reading(data: dict[str, Any]) -> Delta:
    """The delta a reading stands for: one hyperlexeme per label (the first wins), and the
    links whose ends are among them, each once."""
    things: dict[str, Hyperlexeme] = {}
    for item in data.get("hyperlexemes", []):
        label = item["label"].strip().lower()
        if label and label not in things:
            things[label] = Hyperlexeme(id=f"h{len(things) + 1}", label=label,
                                        kind=item["kind"], attrs=dict(item["attrs"]))
    links: dict[tuple[str, str, str, int], Link] = {}
    for k in data.get("links", []):
        src, rel, dst = k["src"].strip().lower(), k["rel"].strip(), k["dst"].strip().lower()
        if src in things and dst in things and rel:
            link = Link(things[src].id, rel, things[dst].id, k["polarity"])
            links.setdefault((link.src, rel, link.dst, link.polarity), link)
    return Delta(hyperlexemes=list(things.values()), links=list(links.values()))


class ReaderEncoder:
    """The scene encoder ``reader``: ``encoder(text) -> Delta``. The engine (llama.cpp when
    installed, else torch; or the one given) and the reader's adapter load on the first call.
    A reading cut by the token limit before its JSON closed gives an empty delta."""

    def __init__(self, bundle: str | Path, engine: Any = None, backend: str = "auto"):
        self.bundle = Path(bundle)
        self.backend = backend
        self._engine = engine
        self._persona: Any = None
        self._lock = threading.Lock()

    def _ready(self) -> tuple[Any, Any]:
        with self._lock:
            if self._persona is None:
                from hyperlex.persona.bundle import Persona

                self._persona = Persona.from_dir(self.bundle)
            if self._engine is None:
                from hyperlex.engines.registry import engine_entry, open_engine

                backend = self.backend
                if backend == "auto":
                    backend = "llamacpp" if engine_entry("llamacpp").available() else "torch"
                engine = open_engine([self._persona], backend, progress=False)
                if self._persona.name in engine.skipped:
                    raise HyperlexError(engine.skipped[self._persona.name])
                self._engine = engine
            return self._engine, self._persona

    def warm_up(self) -> None:
        """Load the engine and the adapter now (``agent chat`` calls it in the background
        for a persona whose ``scene_encoder`` is ``reader``)."""
        self._ready()

    def __call__(self, text: str) -> Delta:
        return self.read([text])[0]

    def read(self, texts: Sequence[str]) -> list[Delta]:
        """One delta per text; the torch engine reads them as one batch."""
        from hyperlex.persona.prompt import build_prompt
        from hyperlex.structured import ReplyNotValid, ResponseFormat

        engine, persona = self._ready()
        fmt = ResponseFormat.json_schema(READ_SCHEMA, "reading")
        params = persona.contract.params()
        requests = [(build_prompt(persona, text, counter=engine), persona.name)
                    for text in texts]
        deltas = []
        for reply in engine.generate_batch(requests, params, response_format=fmt):
            try:
                deltas.append(delta_from_reading(fmt.parse(reply.text)))
            except ReplyNotValid:
                deltas.append(Delta())
        return deltas
