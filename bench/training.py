"""P7: ``agent train``'s tokens/s vs a minimal hand-written PEFT loop on the same data (which
keeps the full logits), its peak memory within a 3 GiB budget, and QLoRA's peak memory vs
LoRA on a float32 base. Each run is a subprocess (bench.train_worker)."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import Config, Row

TRAINER = "philosopher"  # the shipped bundle whose data and train.yaml are used


def training_bundle(config: Config, workdir: Path, steps: int) -> Path:
    """A copy of the philosopher bundle with the first ``steps`` batches of its data, no
    held-out set, no adapter (the runs train one) and ``base_model`` set to the base being
    measured."""
    import hyperlex.personas
    from hyperlex.engines.models import resolve_base
    from hyperlex.training.train import load_config

    source = Path(hyperlex.personas.__file__).parent / TRAINER
    target = workdir / "train-bench"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("adapter", "data"))
    batch = load_config(source).batch_size if not config.quick else 2
    (target / "data").mkdir()
    lines = (source / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (target / "data" / "train.jsonl").write_text(
        "\n".join(lines[: steps * batch]) + "\n", encoding="utf-8")
    yaml = target / "persona.yaml"
    text = re.sub(r"^base_model:.*$", f"base_model: {resolve_base(config.base).name}",
                  yaml.read_text(encoding="utf-8"), count=1, flags=re.MULTILINE)
    yaml.write_text(re.sub(r"^adapter:.*\n", "", text, flags=re.MULTILINE), encoding="utf-8")
    settings = (source / "train.yaml").read_text(encoding="utf-8")
    if config.quick:  # small batches; the tiny test tokenizer needs more tokens per reply
        for key, value in (("batch_size", batch), ("max_length", 2048)):
            settings = re.sub(rf"^{key}:.*$", f"{key}: {value}", settings, flags=re.MULTILINE)
    (target / "train.yaml").write_text(settings, encoding="utf-8")
    return target


def run_worker(mode: str, bundle: Path, base: str | None,
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.train_worker", mode, str(bundle), base or "-",
         json.dumps(options or {})],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"training worker {mode!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


MODES = ("hand", "hyperlex", "qlora", "lora-gc", "qlora-gc", "lora-3g", "qlora-3g")


SPEED_PAIRS = 2  # hand and hyperlex runs alternate, so slow spells hit both alike


def training(config: Config, workdir: Path) -> list[Row]:
    steps = 2 if config.quick else 6
    bundle = training_bundle(config, workdir, steps)
    speed: dict[str, list[float]] = {"hand": [], "hyperlex": []}
    runs: dict[str, dict] = {}
    for _ in range(1 if config.quick else SPEED_PAIRS):
        for mode in speed:
            runs[mode] = run_worker(mode, bundle, config.base)
            speed[mode].append(runs[mode]["tokens_per_s"])
    for mode in MODES:
        if mode not in runs:
            runs[mode] = run_worker(mode, bundle, config.base)
    ours, hand = statistics.median(speed["hyperlex"]), statistics.median(speed["hand"])
    rows = [Row("P7", "training tok/s: agent train (vs hand-written PEFT loop)", ours, hand,
                unit="tok/s", alt_label="hand loop", ratio=ours / hand, target=">= 1.2x",
                met=ours / hand >= 1.2,
                details={"steps": steps, "tokens_per_s": speed, "runs": runs})]
    within, full = runs["lora-3g"], runs["hand"]
    rows.append(Row("P7m", "training peak RSS: agent train --max-memory 3G (vs hand loop)",
                    within["peak_rss"], full["peak_rss"], unit="B", alt_label="hand loop",
                    ratio=within["peak_rss"] / full["peak_rss"], target="<= 3 GiB",
                    met=within["peak_rss"] <= 3 * 2**30,
                    details={"measure": "total peak RSS, one process per run",
                             "plan": within["memory_plan"],
                             "tokens_per_s": {m: runs[m]["tokens_per_s"]
                                              for m in ("lora-3g", "hand")}}))
    for pid, qlora, lora, what in (
            ("P7q", "qlora", "hyperlex", "training peak memory: QLoRA (vs LoRA, float32 base)"),
            ("P7qc", "qlora-gc", "lora-gc", "the same, both with gradient checkpointing"),
            ("P7q3", "qlora-3g", "lora-3g", "the same, both with --max-memory 3G")):
        ours, theirs = runs[qlora]["peak_delta_bytes"], runs[lora]["peak_delta_bytes"]
        rows.append(Row(pid, what, ours, theirs, unit="B", alt_label="LoRA",
                        ratio=ours / theirs, target="<= 0.7x", met=ours / theirs <= 0.7,
                        details={"measure": "peak RSS minus RSS after imports, one process "
                                 "per run", "tokens_per_s": {m: runs[m]["tokens_per_s"]
                                                             for m in (qlora, lora)},
                                 "plans": {m: runs[m]["memory_plan"] for m in (qlora, lora)}}))
    return rows
