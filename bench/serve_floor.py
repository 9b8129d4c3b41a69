"""Rows S2f and S3f: the best S2 and S3 this machine's arithmetic allows for the burst that
was served, so the S rows say how far the scheduler is from the hardware, not only from the
issue's targets.

During the burst every ``llama_decode`` the engine makes is counted: the tokens each prompt's
prefill decoded (what its cache could not give; 0 for a prompt a sequence had prefilled
whole) and the tokens of the decode steps. Then, on
an idle context of the same engine, the cheapest cost per token is measured for each kind:
prefill in whole blocks (:data:`~hyperlex.engines.llamacpp.contexts.PREFILL_BLOCK`) and a
decode step at the batch size that makes a token cheapest, each the fastest of several
repeats (a busy machine only ever adds time). No schedule can do the burst's work in less
than its tokens times those costs (both kinds keep every core busy), so:

- the burst takes at least ``prefill tokens x prefill cost + step tokens x step cost``, which
  bounds its served tokens/s (S2f: that ceiling over the one-at-a-time rate);
- the request whose first token is the k-th to arrive (k = the p95 rank) waits for at least k
  prefills, so p95 time to first token is at least the k cheapest prefills' cost (S3f: that
  floor over the time alone).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

STEP_BATCHES = (1, 2, 4, 8, 16)
REPEATS = 7


@dataclass
class DecodeCounts:
    """The decode work of a burst: tokens per prefill, and decode-step tokens."""

    prefills: list[int] = field(default_factory=list)
    step_tokens: int = 0


@contextlib.contextmanager
def counting_decodes() -> Iterator[DecodeCounts]:
    """Count what every llama.cpp context decodes while the block runs (each context decodes
    on its own thread, so a prefill's blocks are summed per thread)."""
    from hyperlex.engines.llamacpp.contexts import Context, Slot

    counts, local, lock = DecodeCounts(), threading.local(), threading.Lock()
    decode, prefill = Context.decode, Slot.prefill

    def counted_decode(self: Any, entries: list[Any], outputs: str) -> None:
        decode(self, entries, outputs)
        if outputs == "all":
            with lock:
                counts.step_tokens += len(entries)
        else:
            local.tokens = getattr(local, "tokens", 0) + len(entries)

    def counted_prefill(self: Any, prompt: list[int], source: Any = None) -> Any:
        local.tokens = 0
        logits = prefill(self, prompt, source)
        with lock:
            counts.prefills.append(local.tokens)
        return logits

    def counted_take(self: Any, prompt: list[int], source: Any) -> Any:
        logits = take(self, prompt, source)
        with lock:
            counts.prefills.append(0)  # a prompt a sequence had prefilled already
        return logits

    take = Slot.take_prompt
    Context.decode, Slot.prefill, Slot.take_prompt = (  # type: ignore[method-assign]
        counted_decode, counted_prefill, counted_take)
    try:
        yield counts
    finally:
        Context.decode, Slot.prefill, Slot.take_prompt = (  # type: ignore[method-assign]
            decode, prefill, take)


@dataclass
class TokenCosts:
    prefill_s: float  # seconds per prompt token, decoded in whole blocks
    step_s: float  # seconds per token of a decode step, at the cheapest batch size
    step_batch: int
    steps: dict[int, float]  # batch size -> fastest seconds per step


def token_costs(engine: Any, persona: str) -> TokenCosts:
    """The cheapest seconds per token of each kind of decode, on an idle context of
    ``engine`` under ``persona``'s adapter (its caches are emptied afterwards)."""
    from hyperlex.engines.llamacpp.contexts import PREFILL_BLOCK

    prompt = engine.encode([{"role": "user", "content": "Why do we dream? " * 40}])
    prompt = prompt[: 4 * PREFILL_BLOCK]
    with engine.slot() as slot:
        context = slot.context
        try:
            context.switch((persona, ()))
            prefills = []
            for _ in range(REPEATS):
                slot.truncate(0)  # nothing cached: every block is decoded
                start = time.perf_counter()
                slot.prefill(prompt)
                prefills.append((time.perf_counter() - start) / len(prompt))
            short = prompt[:PREFILL_BLOCK]
            batches = [n for n in STEP_BATCHES if n <= len(context.slots)]
            for sequence in context.slots[:batches[-1]]:
                sequence.truncate(0)
                sequence.decode(short)
            steps = {}
            for n in batches:
                samples = []
                for _ in range(REPEATS):
                    start = time.perf_counter()
                    context.step(context.slots[:n], [short[-1]] * n)
                    samples.append(time.perf_counter() - start)
                steps[n] = min(samples)
        finally:
            context.forget()  # scratch caches: never reused by a turn
    best = min(steps, key=lambda n: steps[n] / n)
    return TokenCosts(min(prefills), steps[best] / best, best, steps)


def floors(counts: DecodeCounts, costs: TokenCosts, requests: int, rank: int
           ) -> dict[str, Any]:
    """The least time the counted work can take, and the least p95 time to a first token
    (``rank``: the p95's place among ``requests`` first tokens)."""
    prefill_tokens = sum(counts.prefills)
    burst_s = prefill_tokens * costs.prefill_s + counts.step_tokens * costs.step_s
    cheapest = sorted(counts.prefills)[:rank]
    return {
        "prefills": len(counts.prefills), "prefill_tokens": prefill_tokens,
        "step_tokens": counts.step_tokens, "requests": requests,
        "prefill_ms_per_token": round(1000 * costs.prefill_s, 3),
        "step_ms_per_token": round(1000 * costs.step_s, 3), "cheapest_step_batch":
        costs.step_batch, "step_ms": {n: round(1000 * s, 2) for n, s in costs.steps.items()},
        "burst_floor_s": round(burst_s, 3),
        "ttft_p95_floor_s": round(sum(cheapest) * costs.prefill_s, 3),
    }
