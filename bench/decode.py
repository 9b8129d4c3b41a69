"""P2: decode speed with a persona active (unmerged and merged) vs the bare base; P6: decode
speed against the memory-bandwidth floor for float32, bfloat16 and 4-bit NF4."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.cast import Cast
from bench.common import Config, Row, collect

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
COPY_BYTES = 256 << 20


def decode_rate(engine: Any, persona: str | None, new_tokens: int,
                repeats: int) -> tuple[float, dict[str, Any]]:
    """Batch-1 greedy decode tokens/s with ``persona`` active, over ``new_tokens`` forced
    tokens: (N - 1) / (time from the first token's logits to the last's), stamped inside
    ``generate`` by a logits processor, so the prompt's prefill is left out and the interval
    is always positive. Median of ``repeats`` runs."""
    import torch
    from transformers import LogitsProcessorList

    inputs = engine.encode(PROMPT)
    pad = engine.tokenizer.pad_token_id
    pad = engine.tokenizer.eos_token_id if pad is None else pad

    def generate(count: int) -> float:
        stamps: list[float] = []

        def stamp(input_ids: Any, scores: Any) -> Any:
            stamps.append(time.perf_counter())
            return scores

        with torch.inference_mode(), engine.activate(persona) as model:
            model.generate(**inputs, max_new_tokens=count, min_new_tokens=count,
                           do_sample=False, temperature=None, top_p=None, top_k=None,
                           pad_token_id=pad, logits_processor=LogitsProcessorList([stamp]))
        return stamps[-1] - stamps[0]

    generate(2)  # warm-up
    decode_s = [generate(new_tokens) for _ in range(repeats)]
    rate = (new_tokens - 1) / statistics.median(decode_s)
    return rate, {"tokens": new_tokens, "decode_s": decode_s}


def switch(engine: Any, persona: str | None) -> None:
    """Switch the engine to ``persona`` (None: the bare base), as a turn would."""
    with engine.activate(persona):
        pass


def active_persona_overhead(config: Config, cast: Cast) -> list[Row]:
    tokens = max(config.max_new_tokens, 8)
    engine = cast.engine(1)
    name = cast.personas(1)[0].name
    base, base_details = decode_rate(engine, None, tokens, config.repeats)
    unmerged, unmerged_details = decode_rate(engine, name, tokens, config.repeats)
    switch(engine, None)
    engine.merge = True
    start = time.perf_counter()
    switch(engine, name)
    merge_s = time.perf_counter() - start
    merged, merged_details = decode_rate(engine, name, tokens, config.repeats)
    start = time.perf_counter()
    switch(engine, None)
    unmerge_s = time.perf_counter() - start
    engine.merge = False
    details = {"persona": name, "base": base_details, "unmerged": unmerged_details,
               "merged": merged_details, "merge_s": merge_s, "unmerge_s": unmerge_s}
    return [
        Row("P2", "active persona, unmerged: decode tok/s (vs bare base)", unmerged, base,
            unit="tok/s", alt_label="bare base", ratio=unmerged / base, target=">= 0.9x",
            met=unmerged / base >= 0.9, details=details),
        Row("P2m", "active persona merged into the base (--merge)", merged, base,
            unit="tok/s", alt_label="bare base", ratio=merged / base, target=">= 0.9x",
            met=merged / base >= 0.9,
            details={"merge_s": merge_s, "unmerge_s": unmerge_s}),
    ]


def copy_bandwidth(repeats: int) -> tuple[float, list[float]]:
    """Bytes/s of a large tensor copy (each byte read once and written once)."""
    import torch

    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        dst.copy_(src)
        samples.append(2 * COPY_BYTES / (time.perf_counter() - start))
    return statistics.median(samples), samples


def weight_bytes(model: Any) -> int:
    """Bytes of the weights one decoded token reads: every parameter and buffer once (a tied
    embedding is read once, by the output head), 4-bit blocks with their scales."""
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        absmax = getattr(state, "absmax", None)
        if absmax is not None:
            total += absmax.numel() * absmax.element_size()
    return total


DTYPES = (("P6f32", "float32", None), ("P6bf16", "bfloat16", None), ("P6nf4", "float32", "nf4"))


def bandwidth_floor(config: Config, cast: Cast) -> list[Row]:
    from hyperlex.engines.torch.engine import TorchEngine

    bandwidth, bandwidth_samples = copy_bandwidth(config.repeats)
    tokens = max(config.max_new_tokens, 8)
    measured: list[tuple[str, str, float, float, dict[str, Any]]] = []
    for pid, dtype, quantize in DTYPES:
        label = quantize or dtype
        engine = TorchEngine([], base=config.base, dtype=dtype, quantize=quantize,
                             progress=False)
        size = weight_bytes(engine.inner_model)
        rate, details = decode_rate(engine, None, tokens, config.repeats)
        floor = bandwidth / size
        measured.append((pid, label, rate, floor, {**details, "weight_bytes": size}))
        del engine
        collect()
    best = max(measured, key=lambda m: m[2] / m[3])  # the dtype closest to its floor
    rows = []
    for pid, label, rate, floor, details in measured:
        fraction = rate / floor
        is_best = pid == best[0]
        rows.append(Row(
            pid, f"batch-1 decode, {label}, vs bandwidth floor" + (" (best)" if is_best else ""),
            rate, floor, unit="tok/s", alt_label="floor", ratio=fraction,
            target=">= 0.6x for the best", met=(fraction >= 0.6) if is_best else None,
            details={**details, "copy_bandwidth_bytes_s": bandwidth,
                     "copy_bandwidth_samples": bandwidth_samples}))
    return rows
