"""Hindsight scene records (``agent data hindsight``): a persona's own words, relabelled
with the scene they say.

Self-distillation (:mod:`hyperlex.eval.faithful`) asks a persona to speak a scene and keeps
the replies that kept it in the persona's voice; on the cast that is one reply in ten or
fewer, so a round yields a handful of records. Hindsight relabelling (after hindsight
experience replay and hindsight instruction relabelling) turns the question round: take
text that is already in the persona's voice (its training replies), read a window of it
with the scene encoder, and make the reading the scene the window was "asked" to say. Every
record is faithful by construction (the text reads back to exactly its scene, negations
included) and in the persona's voice by construction, and there are hundreds per persona.

A window is a run of whole sentences (or verse lines) of one reply, grown from its first
sentence while the reading stays within ``max_hyperlexemes`` things; it is kept when it
reads as at least two things and one link. The persona's ``speaker``/``listener`` (its "I"
and "you") are dropped from the scene, as the round trip ignores them. The records are
``speak_scene`` records, so they train the one scene prompt chat and the round trip use.

Chat-form records (``--chat``) teach what a ``speak_scene`` record cannot: in a conversation
nobody asks for a scene, the user states a fact and the persona answers. The user's message
states up to two of the window's links in plain words, negated ones first ("The premise
does not guarantee the conclusion."), each checked to read back as itself; its scene is what
the encoder reads in that message, said by the user, as ``agent chat`` builds it; the reply
is the window: the persona restating the user's facts, negation kept, in its voice.

The cast's voice data hold few negations (the dreamer's 160 replies give 13 windows with
one), so ``--negate`` adds counterfactual chat turns (after counterfactual data augmentation):
one of a window's affirmed links is negated in the reply itself, by one verb ("sees" ->
"does not see", "is" -> "is not", "can go" -> "can not go"), and the user states the
negated fact. A negated window is kept only when the encoder reads it as the window's own
scene with exactly that link's polarity flipped, so the reply stays faithful and, but for
one "not", in the persona's words. A window's reply is short and opens with the fact the
user just stated, which reads as nobody's voice; ``--whole-reply`` answers with the whole
voice reply instead, the (negated) window in its place, so the fact is restated inside the
persona's own way of answering.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from hyperlex.scene.encoders import VOICE_LABELS, load_pipeline
from hyperlex.scene.model import Delta, Link, Scene, canonical_label, opening_scene
from hyperlex.training.vocabulary import third_person

if TYPE_CHECKING:
    from spacy.tokens import Doc, Token

MAX_HYPERLEXEMES = 8
MIN_HYPERLEXEMES = 2
STATED_LINKS = 2  # the most links a chat-form user message states
_PREPOSITIONS = {"about", "above", "across", "against", "around", "as", "at", "between", "by",
                 "for", "from", "in", "inside", "into", "like", "of", "on", "over", "per",
                 "than", "through", "to", "under", "versus", "with", "without"}
# labels the encoder reads from pronouns and quantifiers ("no one" -> anyone): no article
_BARE = {"anyone", "anything", "everyone", "everything", "someone", "something", "nobody",
         "nothing", "everybody", "somebody", "anybody"}
_NO_ONE = {"anyone": "no one", "anybody": "nobody", "anything": "nothing"}
# a sentence ends at . ! ? or ; followed by space, or at a line break (verse)
_BOUNDARY = re.compile(r"(?<=[.!?;])[ \t]+|\n+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence or line of ``text``, in order, without the breaks."""
    spans, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if text[start:match.start()].strip():
            spans.append((start, match.start()))
        start = match.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def content_scene(delta: Delta) -> Scene:
    """The scene ``delta`` says, without the speaker's "I" and "you" and their links."""
    scene = Scene().apply(delta, turn=0)
    voice = {h.id for h in scene.hyperlexemes.values() if h.label in VOICE_LABELS}
    for hid in voice:
        del scene.hyperlexemes[hid]
    scene.links = [k for k in scene.links if k.src not in voice and k.dst not in voice]
    scene.focus = [hid for hid in scene.focus if hid not in voice]
    return scene


def _says_enough(scene: Scene, max_hyperlexemes: int) -> bool:
    return (MIN_HYPERLEXEMES <= len(scene.hyperlexemes) <= max_hyperlexemes
            and bool(scene.links))


def window_spans(text: str, encoder: Callable[[str], Delta],
                 max_hyperlexemes: int = MAX_HYPERLEXEMES
                 ) -> Iterator[tuple[int, int, Scene]]:
    """(start, end, scene) of the windows of ``text`` worth a record: from each sentence not
    yet used, the longest run of whole sentences whose reading says enough."""
    spans = sentence_spans(text)
    i = 0
    while i < len(spans):
        best: tuple[int, Scene] | None = None
        for j in range(i, len(spans)):
            scene = content_scene(encoder(text[spans[i][0]:spans[j][1]]))
            if len(scene.hyperlexemes) > max_hyperlexemes:
                break
            if _says_enough(scene, max_hyperlexemes):
                best = (j, scene)
        if best is None:
            i += 1
            continue
        yield spans[i][0], spans[best[0]][1], best[1]
        i = best[0] + 1


def windows(text: str, encoder: Callable[[str], Delta],
            max_hyperlexemes: int = MAX_HYPERLEXEMES) -> Iterator[tuple[str, Scene]]:
    """The windows of ``text`` worth a record (:func:`window_spans`), each with the scene it
    reads as."""
    for start, end, scene in window_spans(text, encoder, max_hyperlexemes):
        yield text[start:end], scene


def negated(record: dict[str, Any]) -> bool:
    """Whether a record's scene holds a negated link."""
    return any(link["polarity"] < 0 for link in record["scene"]["links"])


def _noun_phrase(scene: Scene, hid: str) -> str:
    thing = scene.hyperlexemes[hid]
    if thing.label in _BARE:
        return thing.label
    quality = thing.attrs.get("quality")
    return " ".join(["the", *([quality] if isinstance(quality, str) else []), thing.label])


def _verb(rel: str, polarity: int) -> str:
    """``rel`` said in the present, negated with ``polarity`` -1: ``hang at`` -> ``hangs
    at`` / ``does not hang at``, ``be with`` -> ``is not with``, ``around`` -> ``is
    around``."""
    head, _, rest = rel.partition(" ")
    if head == "be" or head in _PREPOSITIONS:
        words = ["is" if polarity > 0 else "is not", "" if head == "be" else head, rest]
    else:
        words = [third_person(head) if polarity > 0 else f"does not {head}", rest]
    return " ".join(word for word in words if word)


def _clause(scene: Scene, link: Link) -> str:
    subject, polarity = _noun_phrase(scene, link.src), link.polarity
    if polarity < 0 and subject in _NO_ONE:  # "no one knows", read as anyone NOT know
        subject, polarity = _NO_ONE[subject], 1
    text = " ".join([subject, _verb(link.rel, polarity), _noun_phrase(scene, link.dst)])
    return text[0].upper() + text[1:] + "."


def _triples(scene: Scene, links: Iterable[Link]) -> set[tuple[str, str, str, int]]:
    labels = {h.id: canonical_label(h.label) for h in scene.hyperlexemes.values()}
    return {(labels[k.src], canonical_label(k.rel), labels[k.dst], k.polarity) for k in links}


def _reads_back(scene: Scene, links: list[Link], encoder: Callable[[str], Delta]
                ) -> tuple[str, Scene] | None:
    text = " ".join(_clause(scene, link) for link in links)
    opened = opening_scene(encoder(text))
    return (text, opened) if _triples(scene, links) <= _triples(opened, opened.links) else None


def statement(scene: Scene, encoder: Callable[[str], Delta]) -> tuple[str, Scene] | None:
    """A user's message stating up to ``STATED_LINKS`` of ``scene``'s links in plain words
    (negated ones first, as the sentences go; each one that reads back as itself), with the
    scene a conversation holds once the user has said it; None when no link can be stated
    or the message does not read back as every link it states."""
    stated: list[Link] = []
    for link in sorted(scene.links, key=lambda k: k.polarity):  # -1 first
        if len(stated) == STATED_LINKS:
            break
        if link.src != link.dst and _reads_back(scene, [link], encoder):
            stated.append(link)
    if not stated:
        return None
    return _reads_back(scene, stated, encoder)


def chat_turn(window: str, scene: Scene, encoder: Callable[[str], Delta]
              ) -> dict[str, Any] | None:
    """The chat-form record of ``window`` read as ``scene`` (see the module docstring), or
    None when no plain message states its links."""
    stated = statement(scene, encoder)
    return None if stated is None else _chat_record(window, *stated)


def _chat_record(window: str, message: str, opened: Scene) -> dict[str, Any]:
    return {"human": message, "scene": opened.to_dict(), "text": window}


def _subject_before(verb: Token, word: Token) -> bool:
    """Whether the subject of ``verb``'s clause (a conjunct's, from its first conjunct)
    comes before ``word``: "not" after ``word`` then negates a statement, not a question."""
    while verb.dep_ == "conj" and not any(c.dep_.startswith("nsubj") for c in verb.children):
        verb = verb.head
    return any(c.dep_ in ("nsubj", "nsubjpass", "expl") and c.i < word.i
               for c in verb.children)


def negate_verb(doc: Doc, verb: Token) -> str | None:
    """``doc``'s text with the clause headed by ``verb`` negated by one word or two ("sees"
    -> "does not see", "is" -> "is not", "can go" -> "can not go"), or None when the clause
    is already negated or has no simple negation (a question, an infinitive, a bare
    participle)."""
    if any(c.dep_ == "neg" or c.lower_ in ("not", "n't", "never") for c in verb.children):
        return None
    text = doc.text
    auxes = [c for c in verb.children if c.dep_ in ("aux", "auxpass") and c.i < verb.i]
    if auxes:
        aux = auxes[0]
        if aux.lower_ == "to" or not _subject_before(verb, aux):
            return None
        end = aux.idx + len(aux.text)
        return f"{text[:end]} not{text[end:]}"
    if not _subject_before(verb, verb):
        return None
    if verb.lemma_ == "be":
        end = verb.idx + len(verb.text)
        return f"{text[:end]} not{text[end:]}"
    do = {"VBZ": "does", "VBP": "do", "VBD": "did"}.get(verb.tag_)
    if do is None or verb.pos_ != "VERB":
        return None
    return f"{text[:verb.idx]}{do} not {verb.lemma_.lower()}{text[verb.idx + len(verb.text):]}"


def negated_windows(window: str, scene: Scene, encoder: Callable[[str], Delta],
                    parse: Callable[[str], Doc] | None = None
                    ) -> Iterator[tuple[str, Scene, tuple[str, str, str, int]]]:
    """Counterfactual versions of ``window`` (read as ``scene``): each with one affirmed
    link negated by :func:`negate_verb`, kept when the encoder reads it as ``scene`` with
    exactly that link's polarity flipped and nothing else changed; with the reading and the
    negated link as a (source, relation, destination, -1) triple of labels."""
    parse = parse or load_pipeline()
    before = _triples(scene, scene.links)
    if not any(t[3] > 0 for t in before):
        return
    labels = {h.label for h in scene.hyperlexemes.values()}
    doc = parse(window)
    for verb in doc:
        if verb.pos_ not in ("VERB", "AUX") or verb.dep_ in ("aux", "auxpass"):
            continue
        text = negate_verb(doc, verb)
        if text is None:
            continue
        reading = content_scene(encoder(text))
        after = _triples(reading, reading.links)
        lost, gained = before - after, after - before
        if (len(lost) == len(gained) == 1 and {h.label for h in reading.hyperlexemes.values()}
                == labels):
            (src, rel, dst, polarity), = lost
            if polarity > 0 and gained == {(src, rel, dst, -1)}:
                yield text, reading, (src, rel, dst, -1)


def _record(window: str, scene: Scene, encoder: Callable[[str], Delta], chat: bool,
            negate: bool) -> dict[str, Any] | None:
    if negate:
        for text, reading, flipped in negated_windows(window, scene, encoder):
            stated = statement(reading, encoder)
            if stated is not None and flipped in _triples(stated[1], stated[1].links):
                return _chat_record(text, *stated) | {
                    "meta": {"chat_turn": True, "counterfactual": True}}
        return None
    if chat:
        record = chat_turn(window, scene, encoder)
        return None if record is None else record | {"meta": {"chat_turn": True}}
    return {"speak_scene": True, "scene": scene.to_dict(), "text": window, "meta": {}}


def hindsight_records(texts: Iterable[tuple[int, str]], encoder: Callable[[str], Delta],
                      count: int | None = None, seed: int = 0,
                      max_hyperlexemes: int = MAX_HYPERLEXEMES,
                      fits: Callable[[dict[str, Any]], bool] | None = None,
                      chat: bool = False, negate: bool = False,
                      whole_reply: bool = False) -> list[dict[str, Any]]:
    """``speak_scene`` records from ``texts`` (``(line, reply)`` pairs of a persona's voice
    data): every window (see :func:`windows`) that ``fits`` (for training: its prompt and
    whole reply within ``max_length`` tokens), or ``count`` of them, those with a negated
    link first, the rest drawn at random (``seed``), kept in the order of the data. With
    ``chat``, their chat-form records instead (:func:`chat_turn`); with ``negate``, the
    chat-form records of their counterfactual versions (:func:`negated_windows`, the first
    whose negated link the user's message states, one per window). With ``whole_reply``
    (chat-form records only), the reply is the whole voice reply with the window (negated,
    for ``negate``) in its place, one record per reply: its first window that makes one."""
    if whole_reply and not (chat or negate):
        raise ValueError("whole_reply applies to chat-form records (chat or negate)")
    found = []
    for line, text in texts:
        for start, end, scene in window_spans(text, encoder, max_hyperlexemes):
            record = _record(text[start:end], scene, encoder, chat, negate)
            if record is None:
                continue
            if whole_reply:
                record["text"] = text[:start] + record["text"] + text[end:]
                record["meta"] |= {"whole_reply": True}
            record["meta"] = {"hindsight": True, "line": line} | record["meta"]
            if fits is None or fits(record):
                found.append(record)
                if whole_reply:
                    break
    if count is None or count >= len(found):
        return found
    order = list(range(len(found)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: not negated(found[i]))
    return [found[i] for i in sorted(order[:count])]
