"""Shared pieces: the run configuration, result rows, timing, the table and the JSON report."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ORDER = ("P1", "P1n", "P1b", "P2", "P2m", "P3", "P4a", "P4b", "P5", "P5h", "P6f32", "P6bf16",
         "P6nf4", "P7", "P7m", "P7q", "P7qc", "P7q3", "L1", "L2", "L2t", "L6", "L7", "L5", "G1",
         "G2", "V1", "V2", "V3", "S1", "S2", "S3", "S2f", "S3f", "S2b", "S3b", "S3p", "S4", "S5",
         "S6", "S7", "S8", "H1", "H2")
# what --only accepts
MEASUREMENTS = ("P1", "P1b", "P2", "P3", "P4", "P5", "P6", "P7", "L", "G", "V", "S", "H")


@dataclass
class Config:
    quick: bool = False
    base: str | None = None  # None: the embedded model
    bundles: Sequence[Path] | None = None  # source bundles to clone; None: the shipped cast
    personas: int = 32  # resident personas for P1, P1b and the top of P4
    few: int = 8  # the smaller resident count P1's independence row compares with
    repeats: int = 5
    switches: int = 200  # timed hyperlex switches per repeat
    max_new_tokens: int = 32
    workdir: Path | None = None  # where cloned bundles go; None: a temporary directory

    @classmethod
    def quick_config(cls, **overrides: Any) -> Config:
        values: dict[str, Any] = dict(quick=True, personas=4, few=2, repeats=2, switches=20,
                                      max_new_tokens=4)
        values.update(overrides)
        return cls(**values)


@dataclass
class Row:
    id: str
    what: str
    hyperlex: float | None = None
    alternative: float | None = None
    unit: str = ""
    alt_label: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def median_time(func: Callable[[], Any], repeats: int,
                setup: Callable[[], Any] | None = None) -> tuple[float, list[float]]:
    """Median wall seconds of ``func`` over ``repeats`` calls (``setup`` runs untimed before
    each), and all the samples."""
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def collect() -> None:
    gc.collect()


def rss_bytes() -> int:
    from hyperlex.training.memory import resident_memory

    return resident_memory()


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.3f} ms" if value < 0.01 else f"{value:.3f} s"
    if unit == "B":
        for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value:.0f} B"
    return f"{value:.4g} {unit}".strip()


def render_table(rows: Iterable[Row]) -> str:
    header = ("id", "what", "hyperlex", "alternative", "ratio", "target", "met?")
    lines = []
    for row in rows:
        alt = fmt(row.alternative, row.unit)
        if row.alt_label and row.alternative is not None:
            alt = f"{alt} ({row.alt_label})"
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        ratio = "-" if row.ratio is None else f"{row.ratio:.3g}x"
        hyper = fmt(row.hyperlex, row.unit) if row.hyperlex is not None else (row.note or "-")
        lines.append((row.id, row.what, hyper, alt, ratio, row.target, met))
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
           "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "processor": platform.processor()}
    try:
        import peft
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    peft=peft.__version__, torch_threads=torch.get_num_threads())
    except ImportError:  # pragma: no cover
        pass
    return info


def run(config: Config, only: Sequence[str] | None = None,
        log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the selected measurements; return the report (``rows`` as dicts, in table order)."""
    from bench import (
        batch,
        best_of,
        cold,
        decode,
        hostile,
        llamacpp,
        memory,
        serve,
        structured,
        switch,
        training,
    )
    from bench.cast import Cast

    known = {m.upper(): m for m in MEASUREMENTS}
    wanted = set(MEASUREMENTS)
    if only:
        wanted = {known.get(s.strip().upper(), s.strip()) for s in only}
    unknown = wanted - set(MEASUREMENTS)
    if unknown:
        raise SystemExit(f"--only: unknown measurement(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(MEASUREMENTS)}")
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hyperlex-bench-") as tmp:
        cast = Cast(config, Path(config.workdir or tmp))
        steps: list[tuple[str, Callable[[], list[Row]]]] = [
            ("P1b", lambda: switch.startup(config, cast)),
            ("P1", lambda: switch.switching(config, cast)),
            ("P2", lambda: decode.active_persona_overhead(config, cast)),
            ("P3", lambda: batch.mixed_batch(config, cast)),
            ("P4", lambda: memory.memory(config, cast)),
            ("P5", lambda: cold.cold_start(config)),
            ("P6", lambda: decode.bandwidth_floor(config, cast)),
            ("P7", lambda: training.training(config, Path(config.workdir or tmp))),
            ("L", lambda: llamacpp.llamacpp_rows(config, cast)),
            ("G", lambda: structured.grammar_rows(config, cast)),
            ("V", lambda: best_of.best_of_rows(config, cast) + best_of.voice_rows(config)),
            ("S", lambda: serve.serve_load(config, cast)),
            ("H", lambda: hostile.hostile_rows(config, cast)),
        ]
        for name, step in steps:
            if name in wanted:
                log(f"running {name}...")
                rows += step()
                if name != "P1b":  # P1 goes on with P1b's last engine
                    cast.release()
    rows.sort(key=lambda r: ORDER.index(r.id) if r.id in ORDER else len(ORDER))
    return {"quick": config.quick, "base": config.base or "embedded",
            "config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in asdict(config).items() if k not in ("bundles", "workdir")},
            "machine": machine(), "seconds": time.perf_counter() - started,
            "rows": [asdict(r) for r in rows]}


def rows_of(report: dict[str, Any]) -> list[Row]:
    return [Row(**r) for r in report["rows"]]


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
