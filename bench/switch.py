"""P1: persona switch with many personas resident; P1b: start-up attaching them all."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.cast import Cast
from bench.common import Config, Row, median_time


def _switch_samples(engine: Any, names: list[str], calls: int) -> list[float]:
    """Per-call seconds of hyperlex's switch as a turn takes it (taking the engine, switching,
    letting go), cycling through distinct personas (and the bare base) so that no call is the
    no-op of re-activating the active one."""
    cycle = [*names, None]
    samples = []
    for i in range(calls):
        target = cycle[i % len(cycle)]
        start = time.perf_counter()
        with engine.activate(target):
            pass
        samples.append(time.perf_counter() - start)
    return samples


def _reset(engine: Any) -> None:
    """After PEFT's own calls changed the active adapter behind the engine's back: two
    switches, the second never the no-op of re-activating what the engine thinks is active,
    so the last one sets every LoRA layer to the bare base."""
    some = next(n for n, p in engine.personas.items() if p.adapter_dir is not None)
    for target in (some, None):
        with engine.activate(target):
            pass


def _set_adapter_samples(engine: Any, names: list[str], calls: int) -> list[float]:
    samples = []
    for i in range(calls):
        name = names[i % len(names)]
        start = time.perf_counter()
        engine.model.set_adapter(name)
        samples.append(time.perf_counter() - start)
    _reset(engine)
    return samples


def _load_adapter_samples(engine: Any, cast: Cast, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        name, adapter = cast.extra_adapter()
        start = time.perf_counter()
        engine.model.load_adapter(str(adapter), adapter_name=name)
        samples.append(time.perf_counter() - start)
        engine.model.delete_adapter(name)
    _reset(engine)
    return samples


def _same_outputs(engine: Any, name: str) -> bool:
    """Logits with ``name`` active via hyperlex's switch equal those after PEFT's
    ``set_adapter``."""
    import torch

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]) % engine.inner_model.config.vocab_size
    with torch.inference_mode():
        _reset(engine)
        with engine.activate(name) as model:
            ours = model(input_ids=ids).logits
            engine.model.set_adapter(name)
            theirs = model(input_ids=ids).logits
    _reset(engine)
    return bool(torch.equal(ours, theirs))


def switching(config: Config, cast: Cast) -> list[Row]:
    n, few = config.personas, config.few
    calls = config.repeats * config.switches
    medians: dict[int, float] = {}

    def measure(count: int) -> Any:
        engine = cast.engine(count)  # P1b leaves its last N-persona engine here
        names = [p.name for p in cast.personas(count)]
        _switch_samples(engine, names, len(names) + 1)  # warm-up
        medians[count] = statistics.median(_switch_samples(engine, names, calls))
        return engine

    engine = measure(n)
    names = [p.name for p in cast.personas(n)]
    set_calls = max(config.repeats * 4, 4)
    set_adapter = statistics.median(_set_adapter_samples(engine, names, set_calls))
    load_adapter = statistics.median(_load_adapter_samples(engine, cast, config.repeats))
    same = _same_outputs(engine, names[-1])
    layers = len(engine.lora_modules)
    engine = None
    cast.release()
    reload_s, _ = median_time(lambda: cast.build(0), max(1, min(config.repeats, 3)))
    measure(few)
    cast.release()
    ours = medians[n]
    ratio = set_adapter / ours
    return [
        Row("P1", f"persona switch, {n} resident (vs PEFT set_adapter)", ours, set_adapter,
            unit="s", alt_label="set_adapter", ratio=ratio, target="< 0.5 ms and >= 100x",
            met=ours < 0.0005 and ratio >= 100,
            details={"switch_s": ours, "set_adapter_s": set_adapter,
                     "load_adapter_s": load_adapter, "reload_model_s": reload_s,
                     "load_adapter_ratio": load_adapter / ours,
                     "reload_model_ratio": reload_s / ours,
                     "lora_layers": layers, "identical_logits": same,
                     "switch_calls": calls, "set_adapter_calls": set_calls}),
        Row("P1n", f"switch independence: {n} vs {few} resident", ours, medians[few],
            unit="s", alt_label=f"{few} resident", ratio=ours / medians[few],
            target="<= 1.5x", met=ours / medians[few] <= 1.5,
            details={"switch_s_by_resident": {str(k): v for k, v in medians.items()}}),
    ]


def startup(config: Config, cast: Cast) -> list[Row]:
    """Wall time of TorchEngine construction minus the base load measured inside it."""
    n = config.personas
    cast.personas(n)  # clone before timing
    attach, base, total = [], [], []
    engine = None
    for _ in range(config.repeats):
        engine = None
        cast.release()
        engine, seconds, base_seconds = cast.build(n)
        total.append(seconds)
        base.append(base_seconds)
        attach.append(seconds - base_seconds)
    cast.keep(n, engine)  # P1 reuses the last one
    ours, base_s = statistics.median(attach), statistics.median(base)
    return [Row("P1b", f"start-up: attach {n} adapters (vs base load)", ours, base_s,
                unit="s", alt_label="base load", ratio=ours / base_s, target="< 3 s",
                met=ours < 3.0,
                details={"attach_s": attach, "base_load_s": base, "total_s": total,
                         "per_adapter_s": ours / n})]
