"""A synthetic scene <-> text corpus (``agent data synth``).

Scene templates (hyperlexemes with attributes, links with polarity) are crossed with field
variations (emotion, rhythm) and realized as text by a small deterministic grammar, so every
record's text says exactly what its scene holds: negated links become "does not", the
emotion colours the wording and the rhythm sets sentence length and line breaks.

``output`` records train a scene -> text adapter (the scene and field go into the contract's
slots; the reply is the text); ``input`` records train a text -> scene adapter (the human
turn is the text; the reply is the scene delta as canonical JSON).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from typing import Any

from hyperlex.scene.model import Hyperlexeme, Link, Scene, SceneField

DIRECTIONS = ("output", "input", "both")


@dataclass(frozen=True)
class Template:
    name: str
    things: tuple[tuple[str, str, str, dict[str, str]], ...]  # (id, label, kind, attrs)
    links: tuple[tuple[str, str, str, int], ...]  # (src, verb lemma, dst, polarity)


def _t(name: str, things: list, links: list) -> Template:
    return Template(name, tuple((i, label, kind, attrs) for i, label, kind, attrs in things),
                    tuple(links))


TEMPLATES: tuple[Template, ...] = (
    _t("harbor", [("h1", "fisherman", "entity", {"age": "old"}), ("h2", "sea", "entity", {}),
                  ("h3", "storm", "concept", {}), ("h4", "boat", "entity", {"color": "blue"})],
       [("h1", "love", "h2", 1), ("h1", "fear", "h3", -1), ("h1", "repair", "h4", 1)]),
    _t("garden", [("h1", "child", "entity", {}), ("h2", "seed", "entity", {"size": "small"}),
                  ("h3", "rain", "entity", {}), ("h4", "sun", "entity", {})],
       [("h1", "plant", "h2", 1), ("h1", "wait for", "h3", 1), ("h2", "need", "h4", 1)]),
    _t("library", [("h1", "scholar", "entity", {"mood": "tired"}),
                   ("h2", "book", "entity", {"age": "ancient"}), ("h3", "answer", "concept", {})],
       [("h1", "read", "h2", 1), ("h1", "find", "h3", -1)]),
    _t("city", [("h1", "traveler", "entity", {}), ("h2", "city", "entity", {"size": "vast"}),
                ("h3", "map", "entity", {}), ("h4", "friend", "entity", {})],
       [("h1", "cross", "h2", 1), ("h1", "trust", "h3", -1), ("h1", "call", "h4", 1)]),
    _t("forest", [("h1", "fox", "entity", {"color": "red"}), ("h2", "forest", "entity", {}),
                  ("h3", "hunter", "entity", {})],
       [("h1", "know", "h2", 1), ("h1", "see", "h3", -1)]),
    _t("kitchen", [("h1", "cook", "entity", {}), ("h2", "bread", "entity", {"state": "warm"}),
                   ("h3", "guest", "entity", {}), ("h4", "salt", "entity", {})],
       [("h1", "bake", "h2", 1), ("h1", "welcome", "h3", 1), ("h1", "forget", "h4", -1)]),
    _t("mountain", [("h1", "climber", "entity", {}), ("h2", "summit", "entity", {}),
                    ("h3", "fear", "concept", {}), ("h4", "rope", "entity", {})],
       [("h1", "reach", "h2", 1), ("h1", "show", "h3", -1), ("h1", "hold", "h4", 1)]),
    _t("letter", [("h1", "sister", "entity", {}), ("h2", "letter", "entity", {}),
                  ("h3", "brother", "entity", {"place": "far away"})],
       [("h1", "write", "h2", 1), ("h3", "answer", "h2", -1)]),
    _t("orchestra", [("h1", "violinist", "entity", {}), ("h2", "melody", "concept", {}),
                     ("h3", "audience", "entity", {"size": "large"})],
       [("h1", "play", "h2", 1), ("h3", "hear", "h2", 1), ("h3", "applaud", "h1", -1)]),
    _t("lab", [("h1", "scientist", "entity", {}), ("h2", "experiment", "concept", {}),
               ("h3", "result", "concept", {"kind": "surprising"})],
       [("h1", "run", "h2", 1), ("h1", "expect", "h3", -1)]),
    _t("night", [("h1", "owl", "entity", {}), ("h2", "moon", "entity", {"phase": "full"}),
                 ("h3", "village", "entity", {})],
       [("h1", "watch", "h3", 1), ("h2", "light", "h3", 1), ("h3", "sleep through", "h2", -1)]),
    _t("school", [("h1", "teacher", "entity", {}), ("h2", "student", "entity", {}),
                  ("h3", "question", "concept", {"kind": "hard"})],
       [("h2", "ask", "h3", 1), ("h1", "answer", "h3", 1), ("h1", "dismiss", "h2", -1)]),
)

EMOTIONS: dict[str, tuple[float, float, str, str]] = {
    # name: (valence, arousal, adverb, closing line)
    "joy": (0.8, 0.6, "gladly", "Everything feels light."),
    "sadness": (-0.7, 0.3, "sadly", "Something is missing."),
    "anger": (-0.6, 0.9, "fiercely", "It is not fair."),
    "fear": (-0.7, 0.8, "nervously", "Something may go wrong."),
    "calm": (0.3, 0.1, "quietly", "All is still."),
    "wonder": (0.7, 0.7, "in wonder", "How strange and fine it is."),
}
RHYTHMS: tuple[tuple[str, str], ...] = (("fast", "short"), ("moderate", "medium"),
                                        ("slow", "long"))
OUTPUT_ASKS = ("Describe the scene.", "Tell me what is happening.", "Put the scene into words.",
               "What do you see?", "Narrate this moment.")


def build_scene(template: Template) -> Scene:
    things = {i: Hyperlexeme(id=i, label=label, kind=kind, attrs=dict(attrs))
              for i, label, kind, attrs in template.things}
    links = [Link(src=s, rel=rel, dst=d, polarity=pol) for s, rel, d, pol in template.links]
    return Scene(hyperlexemes=things, links=links, focus=list(things))


def scene_delta(scene: Scene) -> dict[str, Any]:
    """The compact delta an input adapter (text -> scene) should produce for ``scene``."""
    return {
        "hyperlexemes": [{"id": h.id, "label": h.label, "kind": h.kind, "attrs": h.attrs}
                         for h in scene.hyperlexemes.values()],
        "links": [{"src": k.src, "rel": k.rel, "dst": k.dst, "polarity": k.polarity}
                  for k in scene.links],
    }


def _noun(h: Hyperlexeme) -> str:
    adjectives = [v for k, v in sorted(h.attrs.items()) if k != "place"]
    place = f" {h.attrs['place']}" if "place" in h.attrs else ""
    return " ".join(["the", *adjectives, h.label]) + place


def _verb(lemma: str, polarity: int) -> str:
    if polarity < 0:
        return f"does not {lemma}"
    head, _, rest = lemma.partition(" ")
    if head.endswith(("s", "sh", "ch", "x")):
        third = head + "es"
    elif head.endswith("y") and head[-2:-1] not in "aeiou":
        third = head[:-1] + "ies"
    else:
        third = head + "s"
    return f"{third} {rest}".strip()


def realize(scene: Scene, emotion: str, tempo: str, line_length: str) -> str:
    """The scene as text: one clause per link, coloured by the emotion, shaped by the rhythm."""
    _, _, adverb, closing = EMOTIONS[emotion]
    clauses = []
    for i, link in enumerate(scene.links):
        src, dst = scene.hyperlexemes[link.src], scene.hyperlexemes[link.dst]
        manner = f" {adverb}" if i == 0 and link.polarity > 0 else ""
        clauses.append(f"{_noun(src)} {_verb(link.rel, link.polarity)} {_noun(dst)}{manner}")
    if tempo == "fast":
        sentences = [c[0].upper() + c[1:] + "." for c in clauses] + [closing]
        return "\n".join(sentences) if line_length == "short" else " ".join(sentences)
    if tempo == "slow":
        body = ", and ".join(clauses)
        return body[0].upper() + body[1:] + f", while {closing[0].lower() + closing[1:]}"
    half = (len(clauses) + 1) // 2
    first, second = " and ".join(clauses[:half]), " and ".join(clauses[half:])
    sentences = [s[0].upper() + s[1:] + "." for s in (first, second) if s]
    return " ".join([*sentences, closing])


def synth_records(count: int | None = None, direction: str = "output",
                  seed: int = 0) -> list[dict[str, Any]]:
    """Records for every template x emotion x rhythm (or a seeded sample of ``count``)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
    rng = random.Random(seed)
    combos = list(itertools.product(TEMPLATES, EMOTIONS, RHYTHMS))
    if count is not None and count < len(combos):
        combos = rng.sample(combos, count)
    records = []
    for template, emotion, (tempo, line_length) in combos:
        valence, arousal, _, _ = EMOTIONS[emotion]
        field = SceneField(valence=valence, arousal=arousal, emotion=emotion, tempo=tempo,
                      line_length=line_length)
        scene = build_scene(template)
        text = realize(scene, emotion, tempo, line_length)
        meta = {"template": template.name, "synthetic": True}
        field_dict = {k: getattr(field, k) for k in ("valence", "arousal", "emotion", "tempo",
                                                     "line_length", "tone")}
        if direction in ("output", "both"):
            records.append({"human": rng.choice(OUTPUT_ASKS), "text": text,
                            "scene": scene.to_dict(), "field": field_dict,
                            "meta": meta | {"direction": "output"}})
        if direction in ("input", "both"):
            records.append({"human": text, "text": json.dumps(scene_delta(scene)),
                            "meta": meta | {"direction": "input"}})
    return records
