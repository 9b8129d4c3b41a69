"""The round trip scene -> text -> scene (``agent eval roundtrip``).

Does a persona keep the meaning of a scene when it speaks it? For each persona and each
evaluation scene:

1. **scene -> text.** The persona speaks the scene through the one scene prompt
   (:func:`hyperlex.persona.prompt.scene_prompt`): its contract's system message, rendered
   with the scene, then the fixed user message ``SAY_SCENE`` carrying the scene's facts. The
   scene is rendered with ``scene_view: all`` and no token budget, whatever the persona's
   own ``scene_view`` and ``scene_budget``: the round trip measures what a persona keeps of
   what it was *given*, so every persona is given the whole scene (a ``focus`` or ``none``
   view would make losses the contract's, not the adapter's). The facts also go in the user
   message because a contract's template need not have a ``{scene}`` slot, and because
   associations are not part of the prompt rendering.
   Decoding is greedy with no repetition penalty (:func:`speaking_params`), batched across
   personas with ``engine.generate_batch``.
2. **text -> scene.** The scene encoder (``default`` unless told otherwise) reads the reply
   back: ``Scene().apply(encoder(reply))``.
3. **score.** :func:`score_roundtrip` compares the source scene with the reply's, reusing
   the label and triple matching of :mod:`hyperlex.eval.scene`.

Metrics (per scene in :class:`RoundtripScore`, micro-averaged over a persona's scenes in
:class:`RoundtripReport`)
=====================================================================================

* ``hyperlexeme_recall`` / ``hyperlexeme_precision`` over canonical labels. The reply's
  ``speaker`` and ``listener`` (the persona's own "I" and "you") are not counted unless the
  source has them, and reply hyperlexemes that name a source association or attribute word
  are neither hits nor inventions.
* ``link_f1`` (and ``link_precision`` / ``link_recall``): strict match on (source label,
  relation, destination label) triples, polarity ignored (as in ``scene_eval``); reply links
  touching an ignored ``speaker``/``listener`` are left out.
* ``link_f1_relaxed``: a source link left unmatched by the strict pass may match, one to one,
  a remaining reply link between the same two hyperlexemes *whatever its relation and
  direction* ("the sailor never noticed the lighthouse" keeps ``sailor NOT see lighthouse``
  as a relation between the two; a passive that the encoder cannot turn active keeps it too).

The three failure modes, each listed with the offending link or detail:

* **split links**: source links with no strict or relaxed match. ``broken``: both endpoints
  came back but nothing links them; ``endpoint lost``: one or both endpoints are missing
  from the reply's scene (``lost`` names them). Rate: split links / source links.
* **impoverished associations**: the source hyperlexemes' attribute values (each word of a
  ``quality`` separately, every other attribute whole) and associations that appear
  nowhere in the reply: not in its text, nor in its scene's labels, attributes or
  associations. Words are compared lowercased, with a plural ``s``/``es``/``ies`` and a
  possessive ``'s`` dropped, and number words read as digits ("three" = 3), so the test is
  lenient about *where* a detail reappears, strict about whether it does. Rate: lost
  details / source details.
* **logical loss**: a matched link (strict or relaxed) whose polarity differs: ``negation
  lost`` (the source says NOT, the reply does not) or ``negation invented``. Rate: flips /
  matched links (0 when nothing matched: a lost link is a split link, not a flip).

Scene files (JSON lines)
========================
One scene per line in ``Scene.to_dict()`` form plus an ``id`` (unique across all files) and
an optional ``reference``: a description that keeps every fact, used by the tests as the
ideal reply and never shown to a persona. Blank lines and lines starting with ``#`` are
skipped; every problem is reported as ``FILE:LINE: ...``. The shipped set is
``hyperlex/eval/data/scenes.jsonl`` (24 scenes of 3-6 hyperlexemes and 2-3 links, half of
them with a negated link).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperlex.errors import HyperlexError
from hyperlex.eval.batched import generate_replies
from hyperlex.eval.scene import prf
from hyperlex.generation import GenerationParams, Guidance, Layers
from hyperlex.persona.prompt import SAY_SCENE, scene_prompt, unguided_prompt
from hyperlex.scene.agreement import Triple, delta_sets, pair_links
from hyperlex.scene.encoders import VOICE_LABELS  # not scene content unless the source has them
from hyperlex.scene.model import Delta, Scene, canonical_label

if TYPE_CHECKING:
    from hyperlex.persona.bundle import Persona

SHIPPED_SCENES = "eval/data/scenes.jsonl"
HELDOUT = "heldout"
HELDOUT_SCENES = "eval/data/heldout-scenes.jsonl"
METRICS = ("hyperlexeme_recall", "hyperlexeme_precision", "hyperlexeme_f1", "link_precision",
           "link_recall", "link_f1", "link_f1_relaxed", "split_links", "impoverished",
           "logical_loss")
"""Per-persona metrics; the last three are failure rates (lower is better)."""
FAILURE_RATES = ("split_links", "impoverished", "logical_loss")
SCENE_RECORD_KEYS = ("id", "reference", "version", "hyperlexemes", "links", "field", "focus")

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBERS = {w: str(i) for i, w in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty"))}


# scene sets ---------------------------------------------------------------------------------


@dataclass
class EvalScene:
    """One evaluation scene: its id, the scene, an optional reference description, and
    where it was read (``FILE:LINE``)."""

    id: str
    scene: Scene
    reference: str | None = None
    where: str = ""


def parse_scenes(text: str, source: str) -> list[EvalScene]:
    """Scenes from JSON-lines ``text``; ``source`` names the file in error messages."""
    items = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        items.append(_parse_scene(line, f"{source}:{number}"))
    return items


def _parse_scene(line: str, where: str) -> EvalScene:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HyperlexError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    scene = _scene_object(record, where)
    scene_id = record.get("id")
    if not isinstance(scene_id, str) or not scene_id.strip():
        raise HyperlexError(f"{where}: 'id' must be a non-empty string")
    return EvalScene(scene_id.strip(), scene, record.get("reference"), where)


def read_scene_file(path: str | Path, text: str | None = None) -> Scene:
    """One scene from a JSON file (``Scene.to_dict()``, or a record of an evaluation-scene
    file, whose ``id`` and ``reference`` are ignored), or from ``text`` read elsewhere (say
    standard input) with ``path`` naming it. Every problem is a HyperlexError naming the
    file, and the line and column of bad JSON."""
    if text is None:
        text = _scene_file_text(Path(path))
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HyperlexError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column "
                            f"{exc.colno})") from None
    return _scene_object(record, str(path))


def _scene_file_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HyperlexError(f"{path}: scene file not found") from None
    except UnicodeDecodeError as exc:
        raise HyperlexError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise HyperlexError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _scene_object(record: Any, where: str) -> Scene:
    """The scene of a decoded scene record, checked (see :func:`_check_scene`)."""
    if not isinstance(record, dict):
        raise HyperlexError(f"{where}: a scene must be a JSON object")
    unknown = sorted(set(record) - set(SCENE_RECORD_KEYS))
    if unknown:
        raise HyperlexError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(SCENE_RECORD_KEYS)}")
    reference = record.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise HyperlexError(f"{where}: 'reference' must be a string")
    for key, kind, name in (("hyperlexemes", list, "array"), ("links", list, "array"),
                            ("field", dict, "object"), ("focus", list, "array")):
        if key in record and not isinstance(record[key], kind):
            raise HyperlexError(f"{where}: '{key}' must be a JSON {name}")
    try:
        scene = Scene.from_dict({k: v for k, v in record.items() if k not in ("id", "reference")})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise HyperlexError(f"{where}: not a scene: {exc}") from None
    _check_scene(scene, where)
    return scene


def _check_scene(scene: Scene, where: str) -> None:
    if not scene.hyperlexemes:
        raise HyperlexError(f"{where}: the scene has no hyperlexemes")
    labels: dict[str, str] = {}
    for hid, hx in scene.hyperlexemes.items():
        if not isinstance(hx.label, str) or not canonical_label(hx.label):
            raise HyperlexError(f"{where}: hyperlexeme {hid!r} needs a non-empty label")
        canon = canonical_label(hx.label)
        if canon in labels:
            raise HyperlexError(f"{where}: hyperlexemes {labels[canon]!r} and {hid!r} have the "
                                f"same label {canon!r}")
        labels[canon] = hid
        if not isinstance(hx.attrs, dict):
            raise HyperlexError(f"{where}: hyperlexeme {hid!r}: attrs must be an object")
        if not isinstance(hx.associations, list) or not all(
                isinstance(a, str) for a in hx.associations):
            raise HyperlexError(f"{where}: hyperlexeme {hid!r}: associations must be a list "
                                "of strings")
    for link in scene.links:
        missing = [end for end in (link.src, link.dst) if end not in scene.hyperlexemes]
        if missing:
            raise HyperlexError(f"{where}: link {link.src} -{link.rel}-> {link.dst}: unknown "
                                f"hyperlexeme id(s) {', '.join(missing)}")
        if not isinstance(link.rel, str) or not canonical_label(link.rel):
            raise HyperlexError(f"{where}: link {link.src} -> {link.dst}: empty relation")
    unknown_focus = [hid for hid in scene.focus if hid not in scene.hyperlexemes]
    if unknown_focus:
        raise HyperlexError(f"{where}: focus names unknown id(s) {', '.join(unknown_focus)}")


def shipped_scenes(name: str = SHIPPED_SCENES) -> list[EvalScene]:
    """A scene set shipped with hyperlex: by default ``hyperlex/eval/data/scenes.jsonl``,
    or ``HELDOUT_SCENES``."""
    return parse_scenes(resources.files("hyperlex").joinpath(name).read_text("utf-8"),
                        f"hyperlex/{name}")


def load_scenes(paths: Sequence[str | Path] = (), shipped: bool = True) -> list[EvalScene]:
    """The shipped scenes (unless ``shipped`` is False), then each file's, in order; the name
    ``heldout`` is the shipped held-out split of the synthetic corpus
    (``hyperlex/eval/data/heldout-scenes.jsonl``, scenes no training sees). An unreadable
    file, a bad line or an id used twice raises HyperlexError naming FILE:LINE."""
    scenes = shipped_scenes() if shipped else []
    for path in paths:
        if str(path) == HELDOUT:
            scenes += shipped_scenes(HELDOUT_SCENES)
            continue
        scenes += parse_scenes(_scene_file_text(Path(path)), str(path))
    seen: dict[str, str] = {}
    for item in scenes:
        if item.id in seen:
            raise HyperlexError(f"{item.where}: scene id {item.id!r} is already used at "
                                f"{seen[item.id]}")
        seen[item.id] = item.where
    if not scenes:
        raise HyperlexError("no scenes to evaluate")
    return scenes


# scoring ------------------------------------------------------------------------------------


@dataclass
class RoundtripScore:
    """How one reply kept one scene; see the module docstring. ``hyperlexemes``, ``links``
    and ``links_relaxed`` are ``scene_eval``-style precision/recall/F1 dicts with counts."""

    hyperlexemes: dict[str, Any]
    links: dict[str, Any]
    links_relaxed: dict[str, Any]
    missing_hyperlexemes: list[str]
    extra_hyperlexemes: list[str]
    source_links: int
    matched_links: int
    split_links: list[dict[str, Any]]
    details: int
    impoverished: list[dict[str, Any]]
    logical_loss: list[dict[str, Any]]
    negations: int = 0  # negated source links
    negations_kept: int = 0  # of those, matched by a negated reply link

    @property
    def failures(self) -> int:
        return len(self.split_links) + len(self.impoverished) + len(self.logical_loss)

    @property
    def rank(self) -> tuple[int, ...]:
        """Higher is a more faithful reply (``agent scene say --best-of``): no negation
        flipped first, then the most links kept (relaxed), the most hyperlexemes kept, the
        fewest other failures."""
        return (-len(self.logical_loss), self.links_relaxed["tp"], self.hyperlexemes["tp"],
                -self.failures)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_delta(scene: Scene) -> Delta:
    return Delta(hyperlexemes=list(scene.hyperlexemes.values()), links=list(scene.links))


def _link_text(triple: Triple, polarity: int) -> str:
    src, rel, dst = triple
    return f"{src} {'NOT ' if polarity < 0 else ''}{rel} {dst}"


def _norm(word: str) -> str:
    word = word.lower()
    if word.endswith("'s"):
        word = word[:-2]
    word = _NUMBERS.get(word, word)
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    return [_norm(w) for w in _WORD.findall(str(text).lower())]


def _vocabulary(reply_text: str, reply: Scene) -> set[str]:
    words = set(_words(reply_text))
    for hx in reply.hyperlexemes.values():
        words.update(_words(hx.label))
        for value in hx.attrs.values():
            words.update(_words(value))
        for association in hx.associations:
            words.update(_words(association))
    return words


def _details(attrs: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """(attribute, value) items of one hyperlexeme: each quality word on its own."""
    for key, value in sorted(attrs.items()):
        if key == "quality" and isinstance(value, str):
            yield from ((key, word) for word in value.split())
        elif value is not None and str(value).strip():
            yield key, str(value)


def score_roundtrip(source: Scene, reply_scene: Scene, reply_text: str = "") -> RoundtripScore:
    """Compare the ``source`` scene with the scene read back from a reply (``reply_scene``,
    and the reply's text for the details); pure, see the module docstring."""
    source_labels = {canonical_label(hx.label) for hx in source.hyperlexemes.values()}
    voice = VOICE_LABELS - source_labels
    _, source_triples = delta_sets(_as_delta(source))
    reply_kinds, reply_all = delta_sets(_as_delta(reply_scene))
    reply_labels = {label for label in reply_kinds if label not in voice}
    reply_triples = {t: p for t, p in reply_all.items() if t[0] not in voice and t[2] not in voice}

    detail_words: set[str] = set()
    for hx in source.hyperlexemes.values():
        for text in (*hx.associations, *(value for _, value in _details(hx.attrs))):
            detail_words.update(_words(text))
    invented = {label for label in reply_labels - source_labels
                if not (words := _words(label)) or not set(words) <= detail_words}
    matched_labels = source_labels & reply_labels
    hyperlexemes = prf(len(matched_labels), len(invented), len(source_labels - reply_labels))

    pairs, unmatched = pair_links(source_triples, reply_triples)
    strict = [source for source, reply in pairs if source == reply]
    split: list[dict[str, Any]] = []
    for triple in unmatched:
        lost = [end for end in (triple[0], triple[2]) if end not in reply_kinds]
        entry: dict[str, Any] = {"link": _link_text(triple, source_triples[triple]),
                                 "kind": "endpoint lost" if lost else "broken"}
        if lost:
            entry["lost"] = sorted(set(lost))
        split.append(entry)
    links = prf(len(strict), len(reply_triples) - len(strict), len(source_triples) - len(strict))
    links_relaxed = prf(len(pairs), len(reply_triples) - len(pairs),
                         len(source_triples) - len(pairs))

    flips = []
    for source_triple, reply_triple in pairs:
        expected, got = source_triples[source_triple], reply_triples[reply_triple]
        if expected != got:
            flips.append({"link": _link_text(source_triple, expected),
                          "reply_link": _link_text(reply_triple, got),
                          "kind": "negation lost" if expected < 0 else "negation invented",
                          "match": "strict" if source_triple == reply_triple else "relaxed"})

    vocabulary = _vocabulary(reply_text, reply_scene)
    details = 0
    impoverished = []
    for hid in sorted(source.hyperlexemes):
        hx = source.hyperlexemes[hid]
        for key, value in _details(hx.attrs):
            details += 1
            if not _found(value, vocabulary):
                impoverished.append({"hyperlexeme": hx.label, "attr": key, "value": value})
        for association in hx.associations:
            details += 1
            if not _found(association, vocabulary):
                impoverished.append({"hyperlexeme": hx.label, "association": association})

    return RoundtripScore(
        hyperlexemes=hyperlexemes, links=links, links_relaxed=links_relaxed,
        missing_hyperlexemes=sorted(source_labels - reply_labels),
        extra_hyperlexemes=sorted(invented),
        source_links=len(source_triples), matched_links=len(pairs), split_links=split,
        details=details, impoverished=impoverished, logical_loss=flips,
        negations=sum(1 for polarity in source_triples.values() if polarity < 0),
        negations_kept=sum(1 for source_triple, reply_triple in pairs
                           if source_triples[source_triple] < 0 > reply_triples[reply_triple]))


def _found(value: str, vocabulary: set[str]) -> bool:
    words = _words(value)
    return bool(words) and all(word in vocabulary for word in words)


# the evaluation -----------------------------------------------------------------------------


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def aggregate(scores: Sequence[RoundtripScore]) -> tuple[dict[str, float], dict[str, int]]:
    """Micro-averaged metrics (see :data:`METRICS`) and counts over several scenes' scores."""
    def total(group: str, key: str) -> int:
        return sum(getattr(s, group)[key] for s in scores)

    labels = prf(*(total("hyperlexemes", k) for k in ("tp", "fp", "fn")))
    links = prf(*(total("links", k) for k in ("tp", "fp", "fn")))
    relaxed = prf(*(total("links_relaxed", k) for k in ("tp", "fp", "fn")))
    split = [e for s in scores for e in s.split_links]
    flips = [e for s in scores for e in s.logical_loss]
    counts = {
        "scenes": len(scores),
        "source_hyperlexemes": labels["tp"] + labels["fn"],
        "source_links": sum(s.source_links for s in scores),
        "matched_links": sum(s.matched_links for s in scores),
        "split_links": len(split),
        "broken_links": sum(e["kind"] == "broken" for e in split),
        "endpoint_lost": sum(e["kind"] == "endpoint lost" for e in split),
        "details": sum(s.details for s in scores),
        "details_lost": sum(len(s.impoverished) for s in scores),
        "polarity_flips": len(flips),
        "negation_lost": sum(e["kind"] == "negation lost" for e in flips),
        "negation_invented": sum(e["kind"] == "negation invented" for e in flips),
    }
    metrics = {
        "hyperlexeme_recall": labels["recall"], "hyperlexeme_precision": labels["precision"],
        "hyperlexeme_f1": labels["f1"], "link_precision": links["precision"],
        "link_recall": links["recall"], "link_f1": links["f1"], "link_f1_relaxed": relaxed["f1"],
        "split_links": _rate(counts["split_links"], counts["source_links"]),
        "impoverished": _rate(counts["details_lost"], counts["details"]),
        "logical_loss": _rate(counts["polarity_flips"], counts["matched_links"]),
    }
    return metrics, counts


@dataclass
class RoundtripReport:
    """Per row (a persona alone, or ``PERSONA+LAYER:WEIGHT`` composed, see
    :func:`composed_row`): ``metrics`` (see :data:`METRICS`), ``counts``, and ``results``:
    one entry per scene with the reply, its scene's labels and links, and the score. The
    rows are in ``personas``."""

    personas: list[str]
    scenes: list[str]
    metrics: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    encoder: str = "default"
    guidance: float = 0.0  # the scene guidance the replies were decoded with (0: none)

    def mean(self) -> dict[str, float]:
        """The unweighted mean of each metric over the personas speaking alone."""
        alone = [p for p in self.personas if "+" not in p] or self.personas
        n = max(len(alone), 1)
        return {m: round(sum(self.metrics[p][m] for p in alone) / n, 4) for m in METRICS}

    def failures(self) -> list[dict[str, Any]]:
        """Every failure, one entry each: persona, scene, mode (split link, impoverished,
        logical loss), detail and the offending reply."""
        found = []
        for name in self.personas:
            for result in self.results.get(name, []):
                score = result["score"]
                base = {"persona": name, "scene": result["scene"], "reply": result["reply"]}
                for entry in score["split_links"]:
                    lost = f" (lost: {', '.join(entry['lost'])})" if entry.get("lost") else ""
                    found.append({**base, "mode": "split link",
                                  "detail": f"{entry['link']}: {entry['kind']}{lost}"})
                for entry in score["impoverished"]:
                    what = (f"{entry['attr']}={entry['value']}" if "attr" in entry
                            else f"association {entry['association']}")
                    found.append({**base, "mode": "impoverished",
                                  "detail": f"{entry['hyperlexeme']}: {what}"})
                for entry in score["logical_loss"]:
                    found.append({**base, "mode": "logical loss",
                                  "detail": f"{entry['kind']}: {entry['link']} -> "
                                            f"{entry['reply_link']}"})
        return found

    def as_dict(self) -> dict[str, Any]:
        return {"personas": self.personas, "scenes": self.scenes, "encoder": self.encoder,
                "guidance": self.guidance, "instruction": SAY_SCENE, "metrics": self.metrics,
                "mean": self.mean(), "counts": self.counts, "results": self.results}

    def table(self) -> str:
        width = max([12, *(len(name) for name in self.personas)])
        head = (f"{'PERSONA':<{width}} {'SCENES':>6} {'H-REC':>6} {'H-PREC':>6} {'LINK-F1':>7} "
                f"{'RELAXED':>7} {'SPLIT':>6} {'IMPOV':>6} {'LOGIC':>6}")
        lines = [head]
        rows = [(n, self.metrics[n], self.counts[n]["scenes"]) for n in self.personas]
        if len(self.personas) > 1:
            rows.append(("mean", self.mean(), len(self.scenes)))
        for name, m, scenes in rows:
            lines.append(
                f"{name:<{width}} {scenes:>6} {m['hyperlexeme_recall']:>6.2f} "
                f"{m['hyperlexeme_precision']:>6.2f} {m['link_f1']:>7.2f} "
                f"{m['link_f1_relaxed']:>7.2f} {m['split_links']:>6.2f} "
                f"{m['impoverished']:>6.2f} {m['logical_loss']:>6.2f}")
        return "\n".join(lines)


def encode_all(encoder: Callable[[str], Delta], texts: list[str]) -> list[Delta | Exception]:
    """Each text's delta, through the encoder's batched ``pipe`` when it has one; a text the
    encoder fails on gives its exception."""
    pipe = getattr(encoder, "pipe", None)
    if callable(pipe):
        try:
            return list(pipe(texts))
        except Exception:  # noqa: BLE001 - fall back to one at a time, to find the culprit
            pass
    results: list[Delta | Exception] = []
    for text in texts:
        try:
            results.append(encoder(text))
        except Exception as exc:  # noqa: BLE001 - a plugin encoder may fail on one reply
            results.append(exc)
    return results


def speaking_params(max_new_tokens: int = 120) -> GenerationParams:
    """Greedy decoding with no repetition penalty: a persona speaking a scene must name the
    scene's own words, and transformers' (and llama.cpp's) penalty divides the logit of
    every token already in the context, the prompt's included. (The scene-writer alone kept
    0.68 of the held-out scenes' hyperlexemes under the other evaluations' penalty of 1.1,
    0.82 without it.)"""
    return GenerationParams(temperature=0, max_new_tokens=max_new_tokens,
                            repetition_penalty=1.0)


def composed_row(persona: str, layer: str, weight: float) -> str:
    """The report row of ``persona`` speaking with ``layer`` composed at ``weight``."""
    return f"{persona}+{layer}:{weight:g}"


def read_back(delta: Delta | Exception) -> Scene:
    """The scene a reply's delta gives on an empty scene (an encoder failure gives none)."""
    return Scene() if isinstance(delta, Exception) else Scene().apply(delta, turn=0)


def roundtrip(engine: Any, personas: dict[str, Persona], scenes: Sequence[EvalScene],
              encoder: Callable[[str], Delta], params: GenerationParams | None = None,
              batch_size: int = 16, progress: Callable[[str], None] | None = None,
              encoder_name: str = "default", layers: Layers = (),
              guidance: float = 0.0) -> RoundtripReport:
    """Every persona speaks every scene, ``encoder`` reads each reply back, and each pair is
    scored with :func:`score_roundtrip`. Each ``(layer, weight)`` of ``layers`` adds a row
    per persona, ``PERSONA+LAYER:WEIGHT``: the persona speaking with that layer composed
    over it (the scene-writer over a persona, say); a layer is not composed over itself.
    ``guidance`` > 0: every reply is decoded with scene guidance at that weight, against
    the same prompt with an empty scene (:func:`hyperlex.persona.prompt.unguided_prompt`)."""
    params = params or speaking_params()
    say = progress or (lambda message: None)
    names = sorted(personas)
    rows: list[tuple[str, str, Layers]] = [(name, name, ()) for name in names]
    for layer, weight in layers:
        rows += [(composed_row(name, layer, weight), name, ((layer, weight),))
                 for name in names if name != layer]
    owners: list[tuple[str, EvalScene]] = []
    replies: list[str] = []
    total = len(rows) * len(scenes)
    # one negative prompt per persona: it holds no scene, so every scene shares it
    negatives = {name: unguided_prompt(personas[name], engine) for name in names} \
        if guidance else {}
    for stack in dict.fromkeys(stack for _, _, stack in rows):
        requests = []
        for row, name, row_stack in rows:
            if row_stack == stack:
                requests += [(scene_prompt(personas[name], item.scene, engine), name)
                             for item in scenes]
                owners += [(row, item) for item in scenes]
        guided = None if not guidance else Guidance(
            guidance, [negatives[name] for _, name in requests])
        done = len(replies)
        replies += generate_replies(
            engine, requests, params, batch_size,
            lambda n, _total, done=done: say(f"generated {done + n}/{total}"), layers=stack,
            guidance=guided)
    names = [row for row, _, _ in rows]
    say("reading the replies back")
    deltas = encode_all(encoder, replies)

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    scores: dict[str, list[RoundtripScore]] = {name: [] for name in names}
    for (name, item), reply, delta in zip(owners, replies, deltas, strict=True):
        error = None
        if isinstance(delta, Exception):
            error = f"encoder failed: {type(delta).__name__}: {delta}"
        try:
            reply_scene = read_back(delta)
        except ValueError as exc:  # a plugin encoder's malformed delta
            reply_scene, error = Scene(), f"encoder gave a bad delta: {exc}"
        score = score_roundtrip(item.scene, reply_scene, reply)
        scores[name].append(score)
        entry: dict[str, Any] = {
            "scene": item.id, "reply": reply,
            "read_back": {"hyperlexemes": sorted(canonical_label(h.label)
                                                 for h in reply_scene.hyperlexemes.values()),
                          "links": reply_scene.render("all").splitlines()[1:]},
            "score": score.as_dict()}
        if error:
            entry["error"] = error
        results[name].append(entry)
    metrics, counts = {}, {}
    for name in names:
        metrics[name], counts[name] = aggregate(scores[name])
    return RoundtripReport(names, [s.id for s in scenes], metrics, counts, results,
                           encoder=encoder_name, guidance=guidance)
