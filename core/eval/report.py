"""Evaluation reports and CI gates for ``agent eval ... --report DIR --thresholds FILE``.

A report is a list of :class:`Section` s, one per evaluation (fidelity, routing, roundtrip,
mood), each built from that evaluation's report object by :func:`fidelity_section`,
:func:`routing_section`, :func:`roundtrip_section` or :func:`mood_section`.
:func:`write_report` writes ``report.md``, ``report.json`` and one PNG per chart into a
directory. Charts are drawn with matplotlib's Agg canvas (no display, no pyplot state);
matplotlib is imported only when a report is written.

Thresholds (YAML)
=================
One mapping per section; each key is a gated metric, with ``_max`` appended for an upper
bound (the metric must not exceed it) and without for a lower bound (it must not fall
below it)::

    fidelity: {macro_f1_adapter: 0.7, neutral_ppl_ratio_max: 1.15}
    routing: {implicit: 0.85}
    roundtrip: {link_f1: 0.3, logical_loss_max: 0.2}

A metric measured per persona must meet its threshold for every persona. Sections that the
command did not run are ignored, so one file serves every ``agent eval`` command. Unknown
sections or keys and non-numbers are errors naming the file and the key (see
:data:`GATED_METRICS` for the metrics).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperlex.errors import HyperlexError
from hyperlex.eval.roundtrip import FAILURE_RATES
from hyperlex.eval.roundtrip import METRICS as ROUNDTRIP_METRICS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hyperlex.eval.fidelity import FidelityReport
    from hyperlex.eval.mood import MoodReport
    from hyperlex.eval.negation import NegationReport
    from hyperlex.eval.roundtrip import RoundtripReport
    from hyperlex.eval.routing import RoutingReport

GATE_EXIT = 3
"""Exit status of an ``agent eval`` command when a metric misses its threshold."""
GATED_METRICS: dict[str, tuple[str, ...]] = {
    "fidelity": ("macro_f1_adapter", "macro_f1_prompted", "macro_f1_base", "gain_recovery",
                 "neutral_ppl_ratio"),
    "routing": ("explicit", "words", "implicit", "all"),
    "roundtrip": ROUNDTRIP_METRICS,
    "mood": ("valence_shift", "tone", "identity"),
    "negation": ("kept", "flipped", "own_voice", "kept_in_voice"),
}
"""Per section, the metrics a thresholds file can gate (``NAME`` or ``NAME_max``)."""
SECTION_TITLES = {"fidelity": "Fidelity", "routing": "Routing", "roundtrip": "Round trip",
                  "mood": "Mood", "negation": "Negation in a conversation"}

Scoped = list[tuple[str, float]]  # (persona or "all", value)


@dataclass
class Chart:
    """One PNG: ``file`` name, ``title`` (its alt text) and a function drawing on a Figure."""

    file: str
    title: str
    draw: Callable[[Figure], None]
    size: tuple[float, float] = (7.0, 4.0)


@dataclass
class Section:
    """One evaluation in a report: its data (the report's JSON), Markdown body, charts, and
    the values its thresholds gate (metric -> [(scope, value)])."""

    name: str
    data: dict[str, Any]
    markdown: str
    charts: list[Chart] = field(default_factory=list)
    metrics: dict[str, Scoped] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return SECTION_TITLES.get(self.name, self.name)


# thresholds ---------------------------------------------------------------------------------


@dataclass
class Thresholds:
    file: str
    values: dict[str, dict[str, float]]

    def count(self, sections: Sequence[str]) -> int:
        return sum(len(self.values.get(name, {})) for name in sections)


@dataclass
class GateFailure:
    section: str
    key: str
    scope: str
    value: float
    threshold: float

    @property
    def upper(self) -> bool:
        return self.key.endswith("_max")

    def text(self) -> str:
        relation = ">" if self.upper else "<"
        scope = "" if self.scope == "all" else f"{self.scope} "
        return (f"{self.section}.{self.key}: {scope}{self.value:.4g} {relation} "
                f"{self.threshold:g}")

    def as_dict(self) -> dict[str, Any]:
        return {"section": self.section, "key": self.key, "scope": self.scope,
                "value": self.value, "threshold": self.threshold,
                "bound": "max" if self.upper else "min"}


def threshold_keys(section: str) -> list[str]:
    return [k for m in GATED_METRICS[section] for k in (m, f"{m}_max")]


def load_thresholds(path: str | Path) -> Thresholds:
    """Read and check a thresholds file; any problem raises HyperlexError naming the file and
    the key."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HyperlexError(f"{path}: thresholds file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise HyperlexError(f"{path}: {line}invalid YAML: "
                            f"{getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HyperlexError(f"{path}: cannot be read: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HyperlexError(f"{path}: must be a mapping of sections "
                            f"({', '.join(GATED_METRICS)})")
    values: dict[str, dict[str, float]] = {}
    for section, entries in data.items():
        if section not in GATED_METRICS:
            raise HyperlexError(f"{path}: {section}: unknown section; known sections: "
                                f"{', '.join(GATED_METRICS)}")
        if entries is None:
            entries = {}
        if not isinstance(entries, dict):
            raise HyperlexError(f"{path}: {section}: must be a mapping of metric: number")
        allowed = threshold_keys(section)
        for key, value in entries.items():
            if key not in allowed:
                raise HyperlexError(f"{path}: {section}.{key}: unknown threshold; known: "
                                    f"{', '.join(allowed)}")
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise HyperlexError(f"{path}: {section}.{key}: must be a number, got {value!r}")
            values.setdefault(section, {})[key] = float(value)
    return Thresholds(str(path), values)


def check(thresholds: Thresholds | None, sections: Sequence[Section]) -> list[GateFailure]:
    """Every (section, key, scope) whose value misses its threshold."""
    failures: list[GateFailure] = []
    if thresholds is None:
        return failures
    for section in sections:
        for key, limit in thresholds.values.get(section.name, {}).items():
            upper = key.endswith("_max")
            metric = key[:-4] if upper else key
            for scope, value in section.metrics.get(metric, []):
                if (value > limit) if upper else (value < limit):
                    failures.append(GateFailure(section.name, key, scope, value, limit))
    return failures


# sections -----------------------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fidelity_section(report: FidelityReport) -> Section:
    from hyperlex.eval.fidelity import CONDITIONS, TARGETS

    names = report.personas
    verdicts = report.verdicts()
    markdown = "\n\n".join([
        report.table(),
        "\n".join(f"- {metric}: **{'met' if met else 'NOT met'}** (target {TARGETS[metric]})"
                  for metric, met in verdicts.items()),
        "![identification macro-F1](fidelity_macro_f1.png)\n\n"
        "![gain recovery and neutral perplexity](fidelity_personas.png)\n\n"
        "![confusion matrices](fidelity_confusion.png)",
    ])

    def draw_f1(fig: Figure) -> None:
        _bars(fig.add_subplot(), list(CONDITIONS), {"macro-F1": [report.macro_f1[c]
                                                               for c in CONDITIONS]},
              "Blind persona identification (macro-F1)", limit=(0, 1),
              target=TARGETS["macro_f1"])

    def draw_personas(fig: Figure) -> None:
        left, right = fig.subplots(1, 2)
        gains = [report.gain_recovery[n] for n in names]
        _bars(left, names, {"GR": [g if g is not None else 0.0 for g in gains]},
              "Prompt-gain recovery", target=TARGETS["gain_recovery"])
        for i, gain in enumerate(gains):
            if gain is None:  # the prompt gained nothing: GR is undefined
                left.text(i, 0.02, "n/a", ha="center", fontsize=8)
        ratios = [report.neutral_ppl_ratio[n] for n in names]
        top = max([*ratios, TARGETS["neutral_ppl_ratio"]])
        _bars(right, names, {"ratio": ratios}, "Neutral perplexity ratio",
              limit=(min([*ratios, 0.95]) - 0.05, top + 0.05),
              target=TARGETS["neutral_ppl_ratio"])

    def draw_confusion(fig: Figure) -> None:
        axes = fig.subplots(1, len(CONDITIONS))
        for ax, condition in zip(axes, CONDITIONS, strict=True):
            _heatmap(ax, report.confusion[condition], names, names, condition,
                     xlabel="predicted", ylabel="persona")

    wide = max(7.0, 1.2 * len(names) * 2)
    charts = [Chart("fidelity_macro_f1.png", "identification macro-F1", draw_f1, (5.0, 3.5)),
              Chart("fidelity_personas.png", "gain recovery and neutral perplexity",
                    draw_personas, (wide, 4.0)),
              Chart("fidelity_confusion.png", "confusion matrices", draw_confusion,
                    (max(10.0, 1.5 * len(names) * 3), max(3.8, 0.5 * len(names) + 2)))]
    metrics: dict[str, Scoped] = {f"macro_f1_{c}": [("all", report.macro_f1[c])]
                                  for c in CONDITIONS}
    metrics["gain_recovery"] = [(n, g) for n in names
                                if (g := report.gain_recovery[n]) is not None]
    metrics["neutral_ppl_ratio"] = [(n, report.neutral_ppl_ratio[n]) for n in names]
    return Section("fidelity", report.as_dict(), markdown, charts, metrics)


def routing_section(report: RoutingReport, cases: str | None = None) -> Section:
    from hyperlex.eval.routing import KINDS, TARGETS

    kinds = [k for k in (*KINDS, "all") if k in report.accuracy]
    rows = [(k, report.counts[k], report.accuracy[k], TARGETS.get(k)) for k in kinds]
    parts = []
    if cases:
        parts.append(f"Cases: `{cases}`")
    parts += [_md_table(("kind", "N", "accuracy", "target"), rows),
              "![routing accuracy](routing_accuracy.png)\n\n"
              "![routing confusion](routing_confusion.png)"]
    if report.errors:
        parts.append(f"Misses ({len(report.errors)}):\n\n" + _md_table(
            ("kind", "message", "current", "expected", "got"),
            [(e["kind"], e["message"], e["current"], e["expected"], e["got"])
             for e in report.errors]))
    labels = sorted({*report.confusion,
                     *(got for row in report.confusion.values() for got in row)})
    matrix = [[report.confusion.get(a, {}).get(b, 0) for b in labels] for a in labels]

    def draw_accuracy(fig: Figure) -> None:
        ax = fig.add_subplot()
        _bars(ax, kinds, {"accuracy": [report.accuracy[k] for k in kinds]},
              "Routing accuracy by kind", limit=(0, 1.05))
        for i, kind in enumerate(kinds):
            if kind in TARGETS:
                ax.hlines(TARGETS[kind], i - 0.4, i + 0.4, colors="crimson", linestyles="--")

    def draw_confusion(fig: Figure) -> None:
        _heatmap(fig.add_subplot(), matrix, labels, labels, "Routing (expected x chosen)",
                 xlabel="chosen", ylabel="expected")

    side = max(4.5, 0.7 * len(labels) + 2.5)
    charts = [Chart("routing_accuracy.png", "routing accuracy", draw_accuracy, (5.0, 3.5)),
              Chart("routing_confusion.png", "routing confusion", draw_confusion,
                    (side + 1, side))]
    data = report.as_dict()
    if cases:
        data = {"cases": cases, **data}
    return Section("routing", data, "\n\n".join(parts), charts,
                   {k: [("all", report.accuracy[k])] for k in kinds})


def roundtrip_section(report: RoundtripReport, scene_files: Sequence[str] = ()) -> Section:
    names = report.personas
    scores = ("hyperlexeme_recall", "hyperlexeme_precision", "link_f1", "link_f1_relaxed")
    header = ("persona", "scenes", "H-recall", "H-precision", "link F1", "relaxed F1",
              "split links", "impoverished", "logical loss")
    rows = [(n, report.counts[n]["scenes"], *(report.metrics[n][m] for m in scores),
             *(report.metrics[n][m] for m in FAILURE_RATES)) for n in names]
    if len(names) > 1:
        mean = report.mean()
        rows.append(("**mean**", len(report.scenes), *(mean[m] for m in scores),
                     *(mean[m] for m in FAILURE_RATES)))
    count_rows = [(n, c["source_links"], c["split_links"], c["broken_links"],
                   c["endpoint_lost"], c["details"], c["details_lost"], c["matched_links"],
                   c["negation_lost"], c["negation_invented"])
                  for n, c in ((n, report.counts[n]) for n in names)]
    sources = ", ".join(f"`{f}`" for f in scene_files) or "the shipped set"
    parts = [
        f"{len(report.scenes)} scenes ({sources}), read back with the `{report.encoder}` "
        + (f"encoder; replies decoded with scene guidance {report.guidance:g}. "
           if report.guidance else "encoder. ")
        + "Split links: source links with no match (rate over source links); "
        "impoverished: attribute values and associations not found in the reply (rate over "
        "details); logical loss: matched links whose polarity flipped (rate over matched "
        "links).",
        _md_table(header, rows),
        _md_table(("persona", "source links", "split", "broken", "endpoint lost", "details",
                   "lost", "matched links", "negation lost", "negation invented"), count_rows),
        "![round-trip scores](roundtrip_scores.png)\n\n"
        "![round-trip failures](roundtrip_failures.png)",
        _failure_listing(report),
    ]
    score_labels = ["H-recall", "H-precision", "link F1", "relaxed F1"]
    failure_labels = ["split links", "impoverished", "logical loss"]

    def draw_scores(fig: Figure) -> None:
        _bars(fig.add_subplot(), names,
              {label: [report.metrics[n][m] for n in names]
               for label, m in zip(score_labels, scores, strict=True)},
              "Round trip: what came back (higher is better)", limit=(0, 1.05))

    def draw_failures(fig: Figure) -> None:
        _bars(fig.add_subplot(), names,
              {label: [report.metrics[n][m] for n in names]
               for label, m in zip(failure_labels, FAILURE_RATES, strict=True)},
              "Round trip: failure rates (lower is better)", limit=(0, 1.05))

    width = max(7.0, 1.3 * len(names) + 3)
    charts = [Chart("roundtrip_scores.png", "round-trip scores", draw_scores, (width, 4.0)),
              Chart("roundtrip_failures.png", "round-trip failures", draw_failures,
                    (width, 4.0))]
    metrics = {m: [(n, report.metrics[n][m]) for n in names] for m in ROUNDTRIP_METRICS}
    data = report.as_dict()
    if scene_files:
        data = {"scene_files": list(scene_files), **data}
    return Section("roundtrip", data, "\n\n".join(parts), charts, metrics)


def _failure_listing(report: RoundtripReport) -> str:
    blocks = []
    for name in report.personas:
        failing = [r for r in report.results.get(name, []) if r["score"]["split_links"]
                   or r["score"]["impoverished"] or r["score"]["logical_loss"]]
        total = len(report.results.get(name, []))
        if not failing:
            blocks.append(f"- {name}: no failure in {total} scenes")
            continue
        lines = [f"<details><summary>{name}: {len(failing)} of {total} scenes with "
                 "failures</summary>", ""]
        for result in failing:
            score = result["score"]
            reply = " ".join(result["reply"].split()) or "(empty reply)"
            lines.append(f"- **{result['scene']}**: {reply}")
            for entry in score["split_links"]:
                lost = f" (lost: {', '.join(entry['lost'])})" if entry.get("lost") else ""
                lines.append(f"  - split link: `{entry['link']}` {entry['kind']}{lost}")
            for entry in score["logical_loss"]:
                lines.append(f"  - logical loss: {entry['kind']}: `{entry['link']}` -> "
                             f"`{entry['reply_link']}`")
            lost_details = [f"{e['hyperlexeme']}: " + (f"{e['attr']}={e['value']}" if "attr" in e
                                                       else e["association"])
                            for e in score["impoverished"]]
            if lost_details:
                lines.append(f"  - impoverished: {'; '.join(lost_details)}")
        lines += ["", "</details>"]
        blocks.append("\n".join(lines))
    return "Failures, per persona (each with its scene and reply):\n\n" + "\n\n".join(blocks)


def mood_section(report: MoodReport) -> Section:
    from hyperlex.eval.mood import CONDITIONS

    names = sorted(report.valence)
    alone, mixed = CONDITIONS
    rows = [(n, report.valence[n][alone], report.valence[n][mixed],
             report.valence[n][mixed] - report.valence[n][alone], report.tone[n][alone],
             report.tone[n][mixed], report.identity[n][alone], report.identity[n][mixed])
            for n in names]
    header = ("persona", "valence", "+mood", "shift", "tone", "+mood", "identity", "+mood")
    markdown = "\n\n".join([
        f"Mood `{report.mood}` at weight {report.weight:g}.",
        _md_table(header, rows),
        "![mood](mood.png)",
    ])

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, 3)
        for ax, (title, table) in zip(axes, (("valence", report.valence),
                                             ("tone", report.tone),
                                             ("identity", report.identity)), strict=True):
            _bars(ax, names, {c: [table[n][c] for n in names] for c in CONDITIONS}, title)

    charts = [Chart("mood.png", "mood shift", draw, (max(10.0, 1.2 * len(names) * 3), 4.0))]
    metrics = {
        "valence_shift": [(n, report.valence[n][mixed] - report.valence[n][alone])
                          for n in names],
        "tone": [(n, report.tone[n][mixed]) for n in names],
        "identity": [(n, report.identity[n][mixed]) for n in names],
    }
    return Section("mood", report.as_dict(), markdown, charts, metrics)


def negation_section(report: NegationReport) -> Section:
    keys = GATED_METRICS["negation"]
    rates = {row: report.rates(row) for row in report.rows}
    rows = [(row, *(rates[row][k] for k in keys)) for row in report.rows]
    markdown = "\n\n".join([
        f"{report.statements} statements of a negated fact, each answered as in agent chat"
        + (f" --best-of {report.best_of}" if report.best_of > 1 else "")
        + (f", with scene guidance {report.guidance:g}." if report.guidance else "."),
        _md_table(("speaker", "kept", "flipped", "in its voice", "kept, in its voice"), rows),
        "![negation](negation.png)",
    ])

    def draw(fig: Figure) -> None:
        _bars(fig.subplots(), report.rows, {k: [rates[r][k] for r in report.rows]
                                            for k in keys}, "negated facts", limit=(0, 1.05))

    charts = [Chart("negation.png", "negation kept", draw,
                    (max(7.0, 1.2 * len(report.rows)), 4.0))]
    metrics = {k: [(row, rates[row][k]) for row in report.rows] for k in keys}
    return Section("negation", report.as_dict(), markdown, charts, metrics)


# drawing ------------------------------------------------------------------------------------


def _bars(ax: Any, categories: Sequence[str], series: dict[str, Sequence[float]], title: str,
          limit: tuple[float, float] | None = None, target: float | None = None) -> None:
    count = max(len(series), 1)
    width = 0.8 / count
    for i, (label, values) in enumerate(series.items()):
        offsets = [x - 0.4 + width * (i + 0.5) for x in range(len(categories))]
        ax.bar(offsets, list(values), width, label=label)
    ax.set_xticks(range(len(categories)), list(categories), rotation=30 if len(categories) > 4
                  else 0, ha="right" if len(categories) > 4 else "center")
    ax.set_title(title, fontsize=10)
    if limit is not None:
        ax.set_ylim(*limit)
    if target is not None:
        ax.axhline(target, color="crimson", linestyle="--", linewidth=1,
                   label=f"target {target:g}")
    if count > 1 or target is not None:
        ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _heatmap(ax: Any, matrix: Sequence[Sequence[float]], rows: Sequence[str],
             cols: Sequence[str], title: str, xlabel: str = "", ylabel: str = "") -> None:
    values = [list(row) for row in matrix] or [[0]]
    ax.imshow(values, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(cols)), list(cols), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    peak = max((v for row in values for v in row), default=0) or 1
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value:
                ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=7,
                        color="white" if value > peak / 2 else "black")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)


def _render_chart(chart: Chart, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=chart.size, layout="constrained")
    FigureCanvasAgg(fig)
    chart.draw(fig)
    fig.savefig(path, dpi=110)


# writing ------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_report(directory: str | Path, sections: Sequence[Section],
                 meta: dict[str, Any] | None = None, thresholds: Thresholds | None = None,
                 failures: Sequence[GateFailure] = ()) -> list[Path]:
    """Write ``report.md``, ``report.json`` and every section's charts into ``directory``
    (created if needed); returns the paths written."""
    from hyperlex import __version__

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HyperlexError(f"{directory}: cannot create the report directory: "
                            f"{exc.strerror or exc}") from None
    written = []
    for section in sections:
        for chart in section.charts:
            path = directory / chart.file
            _render_chart(chart, path)
            written.append(path)
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    meta = {"hyperlex": __version__, "created": created, **(meta or {})}
    names = [s.name for s in sections]
    gate = None
    if thresholds is not None:
        gate = {"file": thresholds.file,
                "thresholds": {k: v for k, v in thresholds.values.items() if k in names},
                "passed": not failures, "failures": [f.as_dict() for f in failures]}
    document = {**meta, "sections": {s.name: s.data for s in sections},
                "charts": {s.name: [c.file for c in s.charts] for s in sections},
                "gate": gate}
    path = directory / "report.json"
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False, default=_jsonable)
                    + "\n", encoding="utf-8")
    written.append(path)
    path = directory / "report.md"
    path.write_text(_markdown(sections, meta, thresholds, failures), encoding="utf-8")
    written.append(path)
    return written


def _markdown(sections: Sequence[Section], meta: dict[str, Any],
              thresholds: Thresholds | None, failures: Sequence[GateFailure]) -> str:
    lines = ["# hyperlex evaluation report", ""]
    facts = [f"hyperlex {meta['hyperlex']}", meta["created"]]
    if meta.get("base"):
        facts.append(f"base `{meta['base']}`")
    lines.append(", ".join(facts) + ".")
    if meta.get("command"):
        lines += ["", f"Command: `{meta['command']}`"]
    if thresholds is not None:
        applied = thresholds.count([s.name for s in sections])
        lines.append("")
        if failures:
            lines.append(f"**Gate: {len(failures)} metric(s) missed their threshold** "
                         f"(`{thresholds.file}`, {applied} thresholds):")
            lines += [""] + [f"- `{f.text()}`" for f in failures]
        else:
            lines.append(f"**Gate: passed** (`{thresholds.file}`, {applied} thresholds).")
    for section in sections:
        lines += ["", f"## {section.title}", "", section.markdown]
    return "\n".join(lines).rstrip() + "\n"
