"""The synthetic scene <-> text corpus (``agent data synth``): scenes the default encoder
reads back from their text, over the shipped vocabulary (``hyperlex.training.vocabulary``).

Each record starts as a *plan*: 2-8 things (nouns from thousands of lemmas), some with a
quality (an adjective; an affect-laden one colours the field) or a count, 1-5 links between
them (everyday transitive verbs; about a third negated) and a few associations. The plan is
realised as text in one of several *registers* (``plain`` sentences, a ``story`` with
connectives, a terse ``report``), which also set the field's tempo and tone. The text is
then read by the default encoder, and the record is kept only if the reading holds exactly
the plan: every thing with its quality and count, every link with its polarity, nothing
else. The scene stored with the text is that reading (as the shipped evaluation scenes are
built), plus the associations, which the text's last sentence names ("Think of ...").

Scenes are split for good: a scene belongs to the ``heldout`` split when a hash of its
labels says so, to ``train`` otherwise, so no training record ever shows a held-out scene.

``output`` records train a scene -> text adapter (the scene goes into the contract's slot;
the reply is the text): every other one is a ``speak_scene`` record, whose prompt is the
one every scene is spoken with (:func:`hyperlex.persona.prompt.scene_prompt`), the rest ask
in a few words; ``input`` records train a text -> scene reader (the human turn is
the text; the reply is the scene delta as JSON).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperlex.scene.encoders import VOICE_LABELS
from hyperlex.scene.model import Delta, Scene, canonical_label
from hyperlex.training.vocabulary import load_vocabulary, plural, third_person

DIRECTIONS = ("output", "input", "both")
REGISTERS = ("plain", "story", "report")
SPLITS = ("train", "heldout")
HELDOUT_SHARE = 8  # one scene in eight is held out
NEGATED_SHARE = 0.35
COUNTS = {2: "two", 3: "three", 4: "four", 5: "five"}
AFFECT_QUALITIES = ("happy", "cheerful", "joyful", "proud", "hopeful", "calm", "gentle",
                    "peaceful", "sad", "lonely", "angry", "afraid", "anxious", "weary",
                    "bitter", "gloomy", "furious", "nervous", "tender", "bright")
OUTPUT_ASKS = ("Describe the scene.", "Tell me what is happening.", "Put the scene into words.",
               "What do you see?", "Say what the scene holds.")
STORY_OPENINGS = ("Meanwhile", "Then", "After that", "Later", "Soon")


@dataclass
class Plan:
    """What a record's text must say."""

    things: list[tuple[str, str | None, int | None]]  # (noun, quality, count)
    links: list[tuple[int, str, int, int]]  # (src thing, verb, dst thing, polarity)
    associations: dict[int, list[str]] = field(default_factory=dict)


def plan_scene(rng: random.Random, vocabulary: dict[str, tuple[str, ...]]) -> Plan:
    size = rng.randint(2, 8)
    nouns = rng.sample(vocabulary["nouns"], size)
    things: list[tuple[str, str | None, int | None]] = []
    for noun in nouns:
        roll = rng.random()
        quality = (rng.choice(AFFECT_QUALITIES) if roll < 0.15 else
                   rng.choice(vocabulary["adjectives"]) if roll < 0.45 else None)
        things.append((noun, quality, None))
    links: list[tuple[int, str, int, int]] = []
    pairs = [(a, b) for a in range(size) for b in range(size) if a != b]
    rng.shuffle(pairs)
    used: set[int] = set()
    for src, dst in pairs:
        if len(links) >= rng.randint(1, min(5, size)) and used == set(range(size)):
            break
        if len(links) >= 5:
            break
        if src in used and dst in used and len(used) < size:
            continue
        polarity = -1 if rng.random() < NEGATED_SHARE else 1
        links.append((src, rng.choice(vocabulary["verbs"]), dst, polarity))
        used |= {src, dst}
    for i, (noun, quality, _) in enumerate(things):  # a count only on an object, never negated
        objects = [k for k in links if k[2] == i]
        if quality is None and objects and all(k[3] > 0 for k in objects) and rng.random() < 0.2:
            things[i] = (noun, None, rng.choice(list(COUNTS)))
    keep = sorted(used)  # a thing in no link is left out: a clause states each thing
    index = {old: new for new, old in enumerate(keep)}
    plan = Plan([things[i] for i in keep],
                [(index[s], v, index[d], p) for s, v, d, p in links])
    for i in rng.sample(range(len(plan.things)), k=min(len(plan.things), rng.randint(0, 2))):
        plan.associations[i] = rng.sample(vocabulary["nouns"], rng.randint(1, 2))
    return plan


def _phrase(thing: tuple[str, str | None, int | None]) -> str:
    noun, quality, count = thing
    if count is not None:
        return f"{COUNTS[count]} {plural(noun)}"
    return " ".join(["the", *([quality] if quality else []), noun])


def _clause(plan: Plan, link: tuple[int, str, int, int], first_mention: set[int]) -> str:
    src, verb, dst, polarity = link
    subject = _phrase(plan.things[src]) if src in first_mention else f"the {plan.things[src][0]}"
    obj = _phrase(plan.things[dst]) if dst in first_mention else f"the {plan.things[dst][0]}"
    first_mention -= {src, dst}
    said = third_person(verb) if polarity > 0 else f"does not {verb}"
    return f"{subject} {said} {obj}"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def realize(plan: Plan, register: str, rng: random.Random) -> tuple[str, str]:
    """(the body that states the scene, the association sentence or "")."""
    fresh = set(range(len(plan.things)))
    clauses = [_clause(plan, link, fresh) for link in plan.links]
    if register == "plain":
        body = " ".join(_sentence(c) for c in clauses)
    elif register == "story":
        body = " ".join(_sentence((rng.choice(STORY_OPENINGS) + ", " if i else "") + clause)
                        for i, clause in enumerate(clauses))
    elif register == "report":
        body = _sentence("; ".join(clauses))
    else:
        raise ValueError(f"register must be one of {', '.join(REGISTERS)}, got {register!r}")
    words = [w for ws in plan.associations.values() for w in ws]
    if not words:
        return body, ""
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return body, f"Think of {listed}."


def split_of(scene: Scene) -> str:
    """``heldout`` or ``train``, fixed by the scene's labels."""
    labels = "|".join(sorted(canonical_label(h.label) for h in scene.hyperlexemes.values()))
    digest = int(hashlib.sha256(labels.encode()).hexdigest()[:8], 16)
    return "heldout" if digest % HELDOUT_SHARE == 0 else "train"


def reads_as_planned(delta: Delta, plan: Plan, named: bool = False) -> bool:
    """The encoder's reading holds exactly the plan's things, attributes and links; with
    ``named``, the text also names the associations ("Think of ..."), which may add those
    words and the listener, and nothing else."""
    # "Think of ..." addresses a listener
    extra = ({w for ws in plan.associations.values() for w in ws} | VOICE_LABELS
             if named else set())
    labels = {h.id: canonical_label(h.label) for h in delta.hyperlexemes}
    things = {canonical_label(h.label): dict(h.attrs) for h in delta.hyperlexemes
              if canonical_label(h.label) not in extra}
    wanted = {}
    for noun, quality, count in plan.things:
        attrs: dict[str, Any] = {}
        if quality:
            attrs["quality"] = quality
        if count:
            attrs["count"] = count
        wanted[noun] = attrs
    triples = {(labels.get(k.src), canonical_label(k.rel), labels.get(k.dst), k.polarity)
               for k in delta.links if not {labels.get(k.src), labels.get(k.dst)} & extra}
    planned = {(plan.things[s][0], v, plan.things[d][0], p) for s, v, d, p in plan.links}
    return things == wanted and triples == planned


def scene_records(count: int, split: str = "train", seed: int = 0,
                  registers: tuple[str, ...] = REGISTERS,
                  encoder: Callable[[str], Delta] | None = None) -> Iterator[dict[str, Any]]:
    """``count`` verified scenes of ``split``: dicts with ``id``, ``reference``, ``register``,
    ``scene`` (a Scene) and ``negated`` (whether a link is negated)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for register in registers:
        if register not in REGISTERS:
            raise ValueError(f"unknown register {register!r}; registers: {', '.join(REGISTERS)}")
    if encoder is None:
        from hyperlex.scene.encoders import DefaultEncoder

        encoder = DefaultEncoder()
    vocabulary = load_vocabulary()
    rng = random.Random(f"{split}:{seed}")
    made = tries = 0
    while made < count:
        tries += 1
        if tries > 50 * count + 100:
            raise RuntimeError(f"only {made} of {count} scenes read back as planned")
        plan = plan_scene(rng, vocabulary)
        register = registers[tries % len(registers)]
        body, think = realize(plan, register, rng)
        delta = encoder(body)
        if not reads_as_planned(delta, plan):
            continue
        scene = Scene().apply(delta, turn=0)
        if split_of(scene) != split:
            continue
        by_label = {canonical_label(h.label): h for h in scene.hyperlexemes.values()}
        for i, words in plan.associations.items():
            by_label[plan.things[i][0]].associations = list(words)
        reference = f"{body} {think}".strip()
        if think and not reads_as_planned(encoder(reference), plan, named=True):
            continue
        made += 1
        yield {"id": f"{split}-{seed}-{made:05d}", "reference": reference,
               "register": register, "scene": scene,
               "negated": any(k.polarity < 0 for k in scene.links)}


def scene_delta(scene: Scene) -> dict[str, Any]:
    """The compact delta a reader (text -> scene) should produce for ``scene``."""
    return {
        "hyperlexemes": [{"id": h.id, "label": h.label, "kind": h.kind, "attrs": h.attrs}
                         for h in scene.hyperlexemes.values()],
        "links": [{"src": k.src, "rel": k.rel, "dst": k.dst, "polarity": k.polarity}
                  for k in scene.links],
    }


def synth_records(count: int = 1000, direction: str = "output", seed: int = 0,
                  split: str = "train", registers: tuple[str, ...] = REGISTERS
                  ) -> list[dict[str, Any]]:
    """Training records (see the module docstring) for ``count`` verified scenes."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
    ask = random.Random(seed)
    records = []
    for item in scene_records(count, split, seed, registers):
        meta = {"synthetic": True, "register": item["register"], "scene_id": item["id"]}
        scene = item["scene"]
        if direction in ("output", "both"):
            # every other record asks in the scene prompt's words (chat, `agent scene say`
            # and the round trip), the rest in a short request with the scene shown
            asked = {"speak_scene": True} if len(records) % 2 == 0 else {
                "human": ask.choice(OUTPUT_ASKS)}
            records.append({**asked, "text": item["reference"], "scene": scene.to_dict(),
                            "meta": meta | {"direction": "output"}})
        if direction in ("input", "both"):
            records.append({"human": item["reference"], "text": json.dumps(scene_delta(scene)),
                            "meta": meta | {"direction": "input"}})
    return records


def eval_scene_lines(count: int, split: str = "heldout", seed: int = 0,
                     registers: tuple[str, ...] = REGISTERS) -> Iterator[str]:
    """``count`` scenes of ``split`` as evaluation-scene JSON lines (``agent eval roundtrip
    --scenes``), one at a time: the scene, its id and its reference text."""
    for item in scene_records(count, split, seed, registers):
        record = {"id": item["id"], "reference": item["reference"], **item["scene"].to_dict()}
        yield json.dumps(record, ensure_ascii=False, sort_keys=True)


def reading_records(count: int, seed: int = 0,
                    encoder: Callable[[str], Delta] | None = None
                    ) -> Iterator[dict[str, Any]]:
    """The scene-reader's synthetic training records (``agent data read``): ``{"human": TEXT,
    "text": READING}`` for ``count`` verified synthetic texts of the train split, where
    READING is the default encoder's reading of TEXT (:func:`hyperlex.agent.reader.reading`).
    A text whose reading does not fit the reader's schema (nothing read, too much, an
    attribute it does not know) is left out."""
    read = encoder or _default_encoder()
    for item in scene_records(count, "train", seed):
        record = _reading_record(item["reference"], "synthetic", read(item["reference"]))
        if record is not None:
            yield record


def bundle_sentences(root: Path) -> list[str]:
    """The sentences and verse lines (3 to 30 words) of a bundle's chat records, both sides,
    from every data file but the held-out one; scene-speaking and plain (replay) records are
    not chat."""
    import re

    from hyperlex.training.train import bundle_chat_examples

    sentences = []
    for example in bundle_chat_examples(root):
        for text in (example.human, example.text):
            for part in re.split(r"(?<=[.!?])\s+|\n+", text or ""):
                if 3 <= len(part.split()) <= 30:
                    sentences.append(part.strip())
    return sentences


def voice_reading_records(sentences: Iterable[str], limit: int, seed: int = 0,
                          encoder: Callable[[str], Delta] | None = None
                          ) -> list[dict[str, Any]]:
    """At most ``limit`` reader records for one persona's ``sentences``, each sentence once,
    in the order given, drawn at random (``seed``) so that half of them, where there are
    enough, hold a negated link: the reader must learn to see "not", and not to see it
    everywhere."""
    read = encoder or _default_encoder()
    records: list[dict[str, Any]] = []
    negated: list[int] = []
    for text in dict.fromkeys(sentences):
        delta = read(text)
        record = _reading_record(text, "voice", delta)
        if record is None:
            continue
        if any(k.polarity < 0 for k in delta.links):
            negated.append(len(records))
        records.append(record)
    rest = sorted(set(range(len(records))) - set(negated))
    draw = random.Random(seed)
    draw.shuffle(negated)
    draw.shuffle(rest)
    half = max(limit // 2, limit - len(rest))
    chosen = sorted(negated[:half] + rest[:limit - min(half, len(negated))])
    return [records[i] for i in chosen]


def _default_encoder() -> Callable[[str], Delta]:
    from hyperlex.scene.encoders import DefaultEncoder

    return DefaultEncoder()


def _reading_record(text: str, source: str, delta: Delta) -> dict[str, Any] | None:
    from hyperlex.agent.reader import reading

    target = reading(delta)
    return None if target is None else {"human": text, "text": target,
                                        "meta": {"source": source}}
