"""Scoring a scene encoder against a gold set of annotated sentences.

Gold format (JSON lines)
========================
One object per line::

    {"text": "The cat did not chase the mouse.",
     "hyperlexemes": [{"label": "cat", "kind": "entity"}, {"label": "mouse", "kind": "entity"}],
     "links": [{"src": "cat", "rel": "chase", "dst": "mouse", "polarity": -1}]}

Links name their ends by label (not by id). Blank lines and lines starting with ``#`` are
skipped. The gold set shipped in the repository (``tests/data/scene_gold.jsonl``) is
annotated by the conventions written in :mod:`hyperlex.scene.encoders`, in short:

* a hyperlexeme for each noun phrase head (lemma; compounds and names as one label), each
  predicative adjective (kind ``quality``), ``speaker`` / ``listener`` for first / second
  person pronouns (and the implicit subject of an imperative), ``anyone`` / ``anything``
  for nobody / nothing; third-person pronouns are resolved to an earlier mention or
  dropped;
* links ``subject -> verb lemma -> object``; prepositions are appended to the verb ("sit
  on"), the copula is ``be`` ("be in" with a preposition), passives are turned active,
  coordination gives one link per conjunct, a preposition on a noun gives a noun link
  (``light -of-> moon``);
* polarity -1 for an odd number of negations in the link's clause or on its ends (not,
  n't, never, no, nobody, nothing, none, no one, neither/nor).

Metrics
=======
* ``hyperlexemes``: micro precision / recall / F1 over each sentence's *set* of canonical
  labels (kinds are not part of the match; ``kinds`` reports their accuracy over the
  matched labels);
* ``links``: micro precision / recall / F1 over each sentence's set of (source label,
  relation, destination label) triples, ignoring polarity;
* ``polarity``: accuracy of the predicted polarity over the gold links that were matched
  (``negated_recall``: the share of matched gold links with polarity -1 predicted -1);
* ``errors``: one entry per sentence with any difference, for debugging.

Targets (issue 4): hyperlexeme F1 >= 0.9, link F1 >= 0.75, polarity accuracy >= 0.95.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyperlex.scene.agreement import Triple, delta_sets
from hyperlex.scene.model import Delta, canonical_label

TARGETS = {"hyperlexeme_f1": 0.9, "link_f1": 0.75, "polarity_accuracy": 0.95}



def load_gold(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a gold file; a malformed line raises ValueError naming it."""
    path = Path(path)
    items = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON: {exc}") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise ValueError(f"{where}: expected an object with a 'text' string")
        labels = set()
        for h in item.setdefault("hyperlexemes", []):
            if not isinstance(h, dict) or not isinstance(h.get("label"), str):
                raise ValueError(f"{where}: each hyperlexeme needs a 'label' string")
            labels.add(canonical_label(h["label"]))
        for link in item.setdefault("links", []):
            if not isinstance(link, dict) or not all(
                isinstance(link.get(k), str) for k in ("src", "rel", "dst")
            ):
                raise ValueError(f"{where}: each link needs 'src', 'rel' and 'dst' strings")
            if link.get("polarity", 1) not in (1, -1):
                raise ValueError(f"{where}: link polarity must be 1 or -1")
            for end in ("src", "dst"):
                if canonical_label(link[end]) not in labels:
                    raise ValueError(f"{where}: link {end} {link[end]!r} is not one of the "
                                     "sentence's hyperlexeme labels")
        items.append(item)
    return items


def prf(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "tp": tp, "fp": fp, "fn": fn}


def score_encoder(encoder: Callable[[str], Delta], gold_path: str | Path) -> dict[str, Any]:
    """Score ``encoder`` on the gold file at ``gold_path``; see the module docstring."""
    gold = load_gold(gold_path)
    h_tp = h_fp = h_fn = l_tp = l_fp = l_fn = 0
    pol_ok = pol_total = neg_ok = neg_total = kind_ok = kind_total = 0
    errors: list[dict[str, Any]] = []
    seconds = 0.0
    for item in gold:
        started = time.perf_counter()
        delta = encoder(item["text"])
        seconds += time.perf_counter() - started
        kinds, triples = delta_sets(delta)
        gold_kinds = {canonical_label(h["label"]): h.get("kind") for h in item["hyperlexemes"]}
        gold_triples: dict[Triple, int] = {
            (canonical_label(k["src"]), canonical_label(k["rel"]), canonical_label(k["dst"])):
            int(k.get("polarity", 1)) for k in item["links"]
        }
        matched = set(kinds) & set(gold_kinds)
        h_tp += len(matched)
        h_fp += len(set(kinds) - set(gold_kinds))
        h_fn += len(set(gold_kinds) - set(kinds))
        wrong_kinds = {}
        for label in matched:
            if gold_kinds[label] is not None:
                kind_total += 1
                if kinds[label] == gold_kinds[label]:
                    kind_ok += 1
                else:
                    wrong_kinds[label] = {"gold": gold_kinds[label], "predicted": kinds[label]}
        matched_links = set(triples) & set(gold_triples)
        l_tp += len(matched_links)
        l_fp += len(set(triples) - set(gold_triples))
        l_fn += len(set(gold_triples) - set(triples))
        wrong_polarity = []
        for triple in sorted(matched_links):
            pol_total += 1
            ok = triples[triple] == gold_triples[triple]
            pol_ok += ok
            if gold_triples[triple] < 0:
                neg_total += 1
                neg_ok += ok
            if not ok:
                wrong_polarity.append({"link": list(triple), "gold": gold_triples[triple],
                                       "predicted": triples[triple]})
        entry = {
            "text": item["text"],
            "missing_hyperlexemes": sorted(set(gold_kinds) - set(kinds)),
            "extra_hyperlexemes": sorted(set(kinds) - set(gold_kinds)),
            "missing_links": [list(t) for t in sorted(set(gold_triples) - set(triples))],
            "extra_links": [list(t) for t in sorted(set(triples) - set(gold_triples))],
            "wrong_polarity": wrong_polarity,
            "wrong_kinds": wrong_kinds,
        }
        problems = sum(len(v) for k, v in entry.items() if k != "text")
        if problems:
            entry["problems"] = problems
            errors.append(entry)
    hyperlexemes, links = prf(h_tp, h_fp, h_fn), prf(l_tp, l_fp, l_fn)
    polarity = round(pol_ok / pol_total, 4) if pol_total else 1.0
    scores = {
        "hyperlexeme_f1": hyperlexemes["f1"],
        "link_f1": links["f1"],
        "polarity_accuracy": polarity,
    }
    errors.sort(key=lambda e: -e["problems"])
    return {
        "gold": str(gold_path),
        "sentences": len(gold),
        "hyperlexemes": hyperlexemes,
        "links": links,
        "polarity": {
            "accuracy": polarity, "correct": pol_ok, "total": pol_total,
            "negated_recall": round(neg_ok / neg_total, 4) if neg_total else 1.0,
            "negated_total": neg_total,
        },
        "kinds": {"accuracy": round(kind_ok / kind_total, 4) if kind_total else 1.0,
                  "correct": kind_ok, "total": kind_total},
        "targets": dict(TARGETS),
        "met": {name: scores[name] >= target for name, target in TARGETS.items()},
        "seconds": round(seconds, 4),
        "sentences_per_second": round(len(gold) / seconds, 1) if seconds else None,
        "errors": errors,
    }
