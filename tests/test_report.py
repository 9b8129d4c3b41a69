"""Evaluation reports and CI thresholds (``hyperlex.eval.report``), on hand-made reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hyperlex.errors import HyperlexError
from hyperlex.eval.fidelity import FidelityReport
from hyperlex.eval.mood import MoodReport
from hyperlex.eval.negation import NegationReport
from hyperlex.eval.report import (
    GATE_EXIT,
    GATED_METRICS,
    check,
    fidelity_section,
    load_thresholds,
    mood_section,
    negation_section,
    roundtrip_section,
    routing_section,
    write_report,
)
from hyperlex.eval.roundtrip import METRICS, RoundtripReport
from hyperlex.eval.routing import RoutingReport

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fidelity_report() -> FidelityReport:
    names = ["alpha", "beta"]
    return FidelityReport(
        personas=names, macro_f1={"base": 0.3, "prompted": 0.6, "adapter": 0.9},
        confusion={c: [[2, 1], [0, 3]] for c in ("base", "prompted", "adapter")},
        nll={n: {"base": 3.0, "prompted": 2.5, "adapter": 2.4} for n in names},
        gain_recovery={"alpha": 1.2, "beta": None},
        neutral_ppl_ratio={"alpha": 1.02, "beta": 1.2})


def routing_report() -> RoutingReport:
    return RoutingReport(
        accuracy={"explicit": 1.0, "words": 1.0, "implicit": 0.8, "all": 0.9},
        counts={"explicit": 2, "words": 2, "implicit": 6, "all": 10},
        errors=[{"message": "why | how?", "kind": "implicit", "current": None,
                 "expected": "alpha", "got": "beta", "reason": "router"}],
        confusion={"alpha": {"alpha": 4, "beta": 1}, "beta": {"beta": 5}})


def roundtrip_report() -> RoundtripReport:
    metrics = {
        "alpha": dict.fromkeys(METRICS, 0.5) | {"logical_loss": 0.25},
        "beta": dict.fromkeys(METRICS, 0.8) | {"logical_loss": 0.0, "split_links": 0.1},
    }
    counts = {n: {"scenes": 1, "source_links": 2, "split_links": 1, "broken_links": 1,
                  "endpoint_lost": 0, "details": 2, "details_lost": 1, "matched_links": 1,
                  "polarity_flips": 1, "negation_lost": 1, "negation_invented": 0}
              for n in metrics}
    score = {"split_links": [{"link": "cat sit on mat", "kind": "broken"}],
             "impoverished": [{"hyperlexeme": "cat", "attr": "quality", "value": "black"}],
             "logical_loss": [{"link": "cat NOT chase mouse", "reply_link": "cat chase mouse",
                               "kind": "negation lost", "match": "strict"}]}
    results = {n: [{"scene": "cat-mat", "reply": "The cat chases the mouse.", "score": score}]
               for n in metrics}
    return RoundtripReport(["alpha", "beta"], ["cat-mat"], metrics, counts, results)


def mood_report() -> MoodReport:
    table = {n: {"persona": 0.2, "persona+mood": -0.1} for n in ("alpha", "beta")}
    return MoodReport("melancholic", 1.0, table, {n: {"persona": 0.1, "persona+mood": 0.3}
                                                  for n in table},
                      {n: {"persona": 1.0, "persona+mood": 0.5} for n in table})


def negation_report() -> NegationReport:
    def verdict(kept: bool, refused: str | None, voice: str = "alpha") -> dict:
        return {"negations": 1, "negations_kept": int(kept), "voice": voice,
                "refused": refused}

    flipped, lost = "polarity flipped", "negation lost"
    return NegationReport(4, {
        "alpha": [verdict(True, None), verdict(False, flipped), verdict(False, flipped),
                  verdict(False, lost)],
        "alpha+scribe:0.5": [verdict(True, None), verdict(True, None),
                             verdict(True, "voice read as beta", "beta"), verdict(False, lost)]})


def all_sections():
    return [fidelity_section(fidelity_report()), routing_section(routing_report(), "cases.jsonl"),
            roundtrip_section(roundtrip_report()), mood_section(mood_report()),
            negation_section(negation_report())]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "thresholds.yaml"
    path.write_text(text)
    return path


def test_thresholds_are_read_per_section(tmp_path: Path) -> None:
    path = write(tmp_path, "fidelity: {macro_f1_adapter: 0.7}\nrouting: {implicit: 0.85}\n"
                           "roundtrip: {link_f1: 0.3, logical_loss_max: 0.2}\n")
    thresholds = load_thresholds(path)
    assert thresholds.values == {"fidelity": {"macro_f1_adapter": 0.7},
                                 "routing": {"implicit": 0.85},
                                 "roundtrip": {"link_f1": 0.3, "logical_loss_max": 0.2}}
    assert thresholds.count(["routing", "roundtrip"]) == 3
    assert load_thresholds(write(tmp_path, "")).values == {}


@pytest.mark.parametrize("text, message", [
    ("roundtrip: {link_f2: 0.3}", "roundtrip.link_f2: unknown threshold; known: "
                                  "hyperlexeme_recall, hyperlexeme_recall_max"),
    ("speed: {tokens: 3}", "speed: unknown section; known sections: fidelity, routing"),
    ("routing: {implicit: high}", "routing.implicit: must be a number, got 'high'"),
    ("routing: {implicit: true}", "routing.implicit: must be a number"),
    ("routing: [implicit]", "routing: must be a mapping of metric: number"),
    ("- routing", "must be a mapping of sections"),
    ("routing: {implicit: [", "invalid YAML"),
])
def test_bad_thresholds_name_the_file_and_the_key(tmp_path: Path, text: str,
                                                  message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(HyperlexError) as info:
        load_thresholds(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_every_gated_metric_is_measured_by_its_section() -> None:
    for section in all_sections():
        assert set(section.metrics) == set(GATED_METRICS[section.name]), section.name


def test_check_applies_lower_and_upper_bounds_to_every_persona(tmp_path: Path) -> None:
    path = write(tmp_path, "roundtrip: {link_f1: 0.6, logical_loss_max: 0.2}\n"
                           "fidelity: {gain_recovery: 1.0, neutral_ppl_ratio_max: 1.1}\n"
                           "routing: {implicit: 0.85, explicit: 1.0}\n"
                           "mood: {valence_shift_max: -0.2}\n"
                           "negation: {kept: 0.5, flipped_max: 0.25}\n")
    thresholds = load_thresholds(path)
    failures = check(thresholds, all_sections())
    assert [f.text() for f in failures] == [
        "fidelity.neutral_ppl_ratio_max: beta 1.2 > 1.1",  # beta's GR is None: not gated
        "routing.implicit: 0.8 < 0.85",
        "roundtrip.link_f1: alpha 0.5 < 0.6",
        "roundtrip.logical_loss_max: alpha 0.25 > 0.2",
        "negation.kept: alpha 0.25 < 0.5",
        "negation.flipped_max: alpha 0.5 > 0.25",
    ]  # both moods shift valence by -0.3, under the -0.2 ceiling
    assert check(thresholds, [routing_section(routing_report())])[0].key == "implicit"
    assert check(None, all_sections()) == []
    assert GATE_EXIT == 3


def test_report_writes_markdown_json_and_charts(tmp_path: Path) -> None:
    from matplotlib.image import imread

    out = tmp_path / "out" / "nested"
    thresholds = load_thresholds(write(tmp_path, "routing: {implicit: 0.85}\n"))
    sections = all_sections()
    failures = check(thresholds, sections)
    written = write_report(out, sections, {"command": "agent eval all", "base": "tiny"},
                           thresholds, failures)
    charts = [c.file for s in sections for c in s.charts]
    assert {p.name for p in written} == {*charts, "report.md", "report.json"}
    for name in charts:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        image = imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    document = json.loads((out / "report.json").read_text())
    assert set(document["sections"]) == {"fidelity", "routing", "roundtrip", "mood",
                                         "negation"}
    assert document["base"] == "tiny" and document["hyperlex"]
    assert document["gate"]["passed"] is False
    assert document["gate"]["failures"][0]["key"] == "implicit"
    assert document["sections"]["routing"]["cases"] == "cases.jsonl"
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# hyperlex evaluation report")
    for title in ("## Fidelity", "## Routing", "## Round trip", "## Mood",
                  "## Negation in a conversation"):
        assert title in markdown
    for name in charts:
        assert f"]({name})" in markdown
    assert "routing.implicit: 0.8 < 0.85" in markdown
    assert "why \\| how?" in markdown  # table cells are escaped
    assert "negation lost: `cat NOT chase mouse` -> `cat chase mouse`" in markdown
    assert "**cat-mat**: The cat chases the mouse." in markdown


def test_report_module_and_eval_help_stay_light() -> None:
    code = ("import sys; import hyperlex.eval.report, hyperlex.eval.roundtrip\n"
            "from hyperlex.cli import main; sys.argv = ['agent', 'eval', 'all', '--help']\n"
            "try: main()\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'matplotlib', 'spacy', 'transformers') "
            "if m in sys.modules]\nassert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_shipped_routing_set_is_the_tests_set() -> None:
    shipped = ROOT / "core" / "eval" / "data" / "routing.jsonl"
    assert shipped.read_text() == (ROOT / "tests" / "data" / "routing.jsonl").read_text()
