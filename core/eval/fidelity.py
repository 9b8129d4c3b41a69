"""Verification of persona adapters (``agent eval``).

Fidelity compares three conditions per persona on its held-out prompts: the bare base with
no prompt, the base with the persona's contract as its prompt, and the adapter with its
contract. It measures

- blind persona identification: a stylometric classifier (:class:`PersonaClassifier`),
  fitted on the personas' reference replies (their training sets), labels each generated
  reply; macro-F1 and the confusion matrix per condition, and the same classifier on the
  held-out reference replies themselves (``references``: how well the judge knows the
  voices it judges);
- prompt-gain recovery GR = (NLL_base - NLL_adapter) / (NLL_base - NLL_prompted) on the
  held-out reference replies: how much of what the prompt buys the adapter recovers;
- perplexity on neutral text with the adapter active against the bare base (no collapse).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hyperlex.errors import HyperlexError
from hyperlex.eval.batched import generate_replies
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import Persona
from hyperlex.persona.prompt import TokenCounter, example_prompt
from hyperlex.training.data import Example, read_dataset

CONDITIONS = ("base", "prompted", "adapter")
TARGETS = {"macro_f1": 0.85, "gain_recovery": 0.8, "neutral_ppl_ratio": 1.10}


@dataclass
class FidelityReport:
    personas: list[str]
    macro_f1: dict[str, float]
    confusion: dict[str, list[list[int]]]
    nll: dict[str, dict[str, float]]  # persona -> condition -> mean NLL per reply token
    gain_recovery: dict[str, float | None]
    neutral_ppl_ratio: dict[str, float]
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    reference_f1: float | None = None  # the classifier on the held-out reference replies

    def verdicts(self) -> dict[str, bool]:
        """Whether each target is met (see TARGETS)."""
        f1 = self.macro_f1
        gains = [g for g in self.gain_recovery.values() if g is not None]
        return {
            "macro_f1": f1["adapter"] >= TARGETS["macro_f1"] and f1["adapter"] > f1["prompted"],
            "gain_recovery": bool(gains) and min(gains) >= TARGETS["gain_recovery"],
            "neutral_ppl_ratio": max(self.neutral_ppl_ratio.values()) <= TARGETS[
                "neutral_ppl_ratio"],
        }

    def as_dict(self) -> dict[str, Any]:
        return {"personas": self.personas, "macro_f1": self.macro_f1,
                "confusion": self.confusion, "nll": self.nll,
                "gain_recovery": self.gain_recovery, "neutral_ppl_ratio": self.neutral_ppl_ratio,
                "reference_macro_f1": self.reference_f1,
                "targets": TARGETS, "met": self.verdicts(), "samples": self.samples}

    def table(self) -> str:
        """A Markdown table: one row per persona, then the macro-F1 row."""
        lines = ["| persona | NLL base | NLL prompted | NLL adapter | GR | neutral ppl x |",
                 "|---|---|---|---|---|---|"]
        for name in self.personas:
            nll, gain = self.nll[name], self.gain_recovery[name]
            lines.append(f"| {name} | {nll['base']:.3f} | {nll['prompted']:.3f} | "
                         f"{nll['adapter']:.3f} | {'-' if gain is None else f'{gain:.2f}'} | "
                         f"{self.neutral_ppl_ratio[name]:.3f} |")
        f1 = self.macro_f1
        judge = "-" if self.reference_f1 is None else f"{self.reference_f1:.2f}"
        lines += ["", "| identification macro-F1 | base | prompted | adapter | references |",
                  "|---|---|---|---|---|",
                  f"| all personas | {f1['base']:.2f} | {f1['prompted']:.2f} | "
                  f"{f1['adapter']:.2f} | {judge} |"]
        return "\n".join(lines)


def neutral_text() -> list[str]:
    text = resources.files("hyperlex").joinpath("eval/data/neutral.txt").read_text("utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


Features = Any
"""An unfitted scikit-learn transformer from a list of texts to a feature matrix."""


def style_features() -> Features:
    """TF-IDF of a text's character 1- to 4-grams, punctuation and spaces included: the
    standard features of authorship attribution. A voice is how a persona writes (its
    function words, stock openings, punctuation), which character n-grams keep and a sentence
    embedding, which encodes what a text is about, mostly does not."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True, min_df=2)


class PersonaClassifier:
    """Which persona wrote a reply: logistic regression on :func:`style_features` (or
    ``features``, an unfitted transformer, cloned), fitted on each persona's reference
    replies. On the cast's held-out reference replies it names the right persona with
    macro-F1 0.99, where the all-MiniLM-L6-v2 sentence embeddings it replaced gave 0.84
    (docs/verification.md, "The voice classifier")."""

    def __init__(self, references: dict[str, list[str]], features: Features | None = None):
        from sklearn.base import clone
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.labels = sorted(references)
        texts = [t for name in self.labels for t in references[name]]
        targets = [name for name in self.labels for _ in references[name]]
        self.model = make_pipeline(style_features() if features is None else clone(features),
                                   LogisticRegression(max_iter=3000, C=10.0))
        try:
            self.model.fit(texts, targets)
        except ValueError as exc:  # e.g. no character n-gram shared by two replies
            raise HyperlexError(f"cannot fit the voice classifier on the reference replies of "
                                f"{', '.join(self.labels)}: too few or too short to tell the "
                                f"voices apart ({exc})") from None

    def predict(self, texts: list[str]) -> list[str]:
        return [str(label) for label in self.model.predict(texts)]

    def probability(self, texts: list[str], label: str) -> list[float]:
        """The classifier's probability that each text is ``label``'s."""
        return [probability for _, probability in self.attribute(texts, label)]

    def attribute(self, texts: list[str], label: str) -> list[tuple[str, float]]:
        """Per text, the persona it is attributed to and the probability that it is
        ``label``'s, from one pass of the texts through the features."""
        if not texts:
            return []
        classes = list(self.model.classes_)
        column = classes.index(label)
        return [(str(classes[row.argmax()]), float(row[column]))
                for row in self.model.predict_proba(texts)]


def voice_scorer(personas: dict[str, Persona], features: Features | None = None
                 ) -> Callable[[list[str], str], list[float]]:
    """The probability that each text is a persona's, from the classifier above fitted on
    the reference replies of every persona (not a layer) in ``personas`` that has training
    data; 0 for a persona without. For ``--best-of``: the data are read and the classifier
    fitted on the first call, so a chat that never samples several replies never pays."""
    import threading

    fitted: dict[str, PersonaClassifier | None] = {}
    lock = threading.Lock()

    def classifier() -> PersonaClassifier | None:
        with lock:
            if not fitted:
                references = {}
                for name, persona in personas.items():
                    if persona.is_layer:
                        continue
                    try:
                        references[name] = load_sets(persona)[1]
                    except HyperlexError:
                        continue
                fitted["model"] = (PersonaClassifier(references, features)
                                   if len(references) > 1 else None)
            return fitted["model"]

    def score(texts: list[str], persona: str) -> list[float]:
        model = classifier()
        if model is None or persona not in model.labels:
            return [0.0] * len(texts)
        return model.probability(texts, persona)

    return score


def macro_f1(truth: Sequence[str], predicted: Sequence[str],
             labels: Sequence[str]) -> tuple[float, list[list[int]]]:
    from sklearn.metrics import confusion_matrix, f1_score

    score = f1_score(truth, predicted, labels=list(labels), average="macro", zero_division=0)
    matrix = confusion_matrix(truth, predicted, labels=list(labels)).tolist()
    return float(score), matrix


def gain_recovery(base: float, prompted: float, adapter: float) -> float | None:
    """(NLL_base - NLL_adapter) / (NLL_base - NLL_prompted); None if the prompt gains nothing."""
    gain = base - prompted
    return None if gain <= 1e-9 else (base - adapter) / gain


def evaluation_params(max_new_tokens: int = 100) -> GenerationParams:
    """Greedy decoding with a mild repetition penalty: the evaluations compare conditions,
    so sampling noise is kept out."""
    return GenerationParams(temperature=0, max_new_tokens=max_new_tokens, repetition_penalty=1.1)


def persona_messages(persona: Persona | None, example: Example,
                     counter: TokenCounter) -> list[dict[str, str]]:
    """The record's prompt as a conversation builds it (``persona`` None: no system)."""
    return example_prompt(persona, example, counter)


def fidelity(engine: Any, personas: dict[str, Persona], heldout: dict[str, list[Example]],
             references: dict[str, list[str]], features: Features | None = None,
             params: GenerationParams | None = None, batch_size: int = 16,
             progress: Callable[[str], None] | None = None) -> FidelityReport:
    """Run the three conditions for every persona and score them (see module docstring)."""
    params = params or evaluation_params()
    names = sorted(personas)
    say = progress or (lambda message: None)
    classifier = PersonaClassifier({n: references[n] for n in names}, features)

    say("generating replies")
    requests, owners = [], []
    for name in names:
        for example in heldout[name]:
            for condition in CONDITIONS:
                contract = None if condition == "base" else personas[name]
                active = name if condition == "adapter" else None
                requests.append((persona_messages(contract, example, engine), active))
                owners.append((name, condition, example.human))
    replies = generate_replies(engine, requests, params, batch_size,
                               lambda done, total: say(f"generated {done}/{total}"))

    f1, confusion, samples = {}, {}, {n: [] for n in names}
    for condition in CONDITIONS:
        picked = [(o[0], r) for o, r in zip(owners, replies, strict=True) if o[1] == condition]
        predicted = classifier.predict([r for _, r in picked])
        f1[condition], confusion[condition] = macro_f1([n for n, _ in picked], predicted, names)
    written = [(n, e.text) for n in names for e in heldout[n]]
    judge = (macro_f1([n for n, _ in written], classifier.predict([t for _, t in written]),
                      names)[0] if written else None)
    for (name, condition, human), reply in zip(owners, replies, strict=True):
        if len(samples[name]) < 3 * len(CONDITIONS):
            samples[name].append({"condition": condition, "human": human, "reply": reply})

    say("scoring held-out replies")
    nll: dict[str, dict[str, float]] = {}
    gains: dict[str, float | None] = {}
    neutral = neutral_text()
    base_neutral = _mean(engine.text_nll(t, None) for t in neutral)
    ppl_ratio: dict[str, float] = {}
    for name in names:
        scores = {}
        for condition in CONDITIONS:
            contract = None if condition == "base" else personas[name]
            active = name if condition == "adapter" else None
            scores[condition] = _mean(
                engine.reply_nll(persona_messages(contract, e, engine), e.text, active)
                for e in heldout[name])
        nll[name] = scores
        gains[name] = gain_recovery(scores["base"], scores["prompted"], scores["adapter"])
        ppl_ratio[name] = math.exp(_mean(engine.text_nll(t, name) for t in neutral)
                                   - base_neutral)
    return FidelityReport(names, f1, confusion, nll, gains, ppl_ratio, samples, judge)


def _mean(pairs: Any) -> float:
    total = count = 0.0
    for value, n in pairs:
        total, count = total + value, count + n
    return total / max(count, 1)


def load_sets(persona: Persona) -> tuple[list[Example], list[str]]:
    """A bundle's held-out examples and its reference replies (its training set's), from the
    files its train.yaml names."""
    from hyperlex.training.train import load_config

    root = persona.root or Path(".")
    config = load_config(root)
    heldout = read_dataset(root / config.heldout)
    references = [e.text for e in read_dataset(root / config.data) if not e.plain]
    return heldout, references
