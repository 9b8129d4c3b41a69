"""bench.serve_floor on the tiny llama.cpp engine: it counts the decode work a burst does and
turns measured costs per token into the S2f/S3f bounds (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.serve_floor import (
    STEP_BATCHES,
    DecodeCounts,
    TokenCosts,
    counting_decodes,
    floors,
    token_costs,
)
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import Persona

from .test_engine_llamacpp import MESSAGES, llama_engine

pytest.importorskip("llama_cpp")

PARAMS = GenerationParams(temperature=0, max_new_tokens=5)


@pytest.fixture
def engine(tiny_base: Path, tiny_bundles: dict[str, Path]):
    pool = llama_engine(tiny_base, [Persona.from_dir(tiny_bundles["alpha"])], contexts=1,
                        sequences=4)
    yield pool
    pool.close()


def test_counts_each_prefill_and_every_step_token(engine) -> None:
    prompt = engine.count_tokens(MESSAGES)
    with counting_decodes() as counts:
        first = engine.generate(MESSAGES, "alpha", PARAMS)
        again = engine.generate(MESSAGES, "alpha", PARAMS)
    assert counts.prefills == [prompt, 0]  # asked again, the prompt was held whole
    # the first token comes from the prefill's logits; each later one needs a step
    assert counts.step_tokens == (first.usage.completion_tokens - 1
                                  + again.usage.completion_tokens - 1)
    engine.generate(MESSAGES, "alpha", PARAMS)
    assert len(counts.prefills) == 2  # nothing is counted outside the block


def test_token_costs_leave_no_cache_a_turn_could_reuse(engine) -> None:
    before = engine.generate(MESSAGES, "alpha", PARAMS).text
    costs = token_costs(engine, "alpha")
    assert costs.prefill_s > 0 and costs.step_s > 0
    assert set(costs.steps) == {n for n in STEP_BATCHES if n <= 4}
    assert costs.step_s == min(seconds / n for n, seconds in costs.steps.items())
    with engine.slot() as slot:
        assert slot.context.composition is None and not any(s.tokens for s in slot.context.slots)
    assert engine.generate(MESSAGES, "alpha", PARAMS).text == before


def test_floors_are_the_work_at_the_cheapest_costs() -> None:
    counts = DecodeCounts(prefills=[100, 40, 60, 80], step_tokens=300)
    costs = TokenCosts(prefill_s=0.004, step_s=0.005, step_batch=8, steps={8: 0.04})
    floor = floors(counts, costs, requests=4, rank=3)
    assert floor["prefill_tokens"] == 280
    assert floor["burst_floor_s"] == pytest.approx(280 * 0.004 + 300 * 0.005)
    # the third first token waits for at least the three cheapest prefills
    assert floor["ttft_p95_floor_s"] == pytest.approx((40 + 60 + 80) * 0.004)
