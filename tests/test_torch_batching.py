"""Streamed turns that wait together on the torch engine run as one batch (tiny model): each
row keeps its persona, its length, its cancel and its text."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import hyperlex.engines.torch.batching as torch_batching
from hyperlex.generation import GenerationParams

GREEDY = GenerationParams(temperature=0, max_new_tokens=8)
QUESTION = [{"role": "user", "content": "What is time?"}]


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the scheduler runs (a turn run alone is not recorded)."""
    sizes: list[int] = []
    original = torch_batching.run_batch

    def recording(engine, generations):
        sizes.append(len(generations))
        return original(engine, generations)

    monkeypatch.setattr(torch_batching, "run_batch", recording)
    return sizes


def alone(engine, persona, params=GREEDY, messages=QUESTION):
    return engine.generate(messages, persona, params)


@contextlib.contextmanager
def engine_busy(engine) -> Iterator[None]:
    """Keep the engine inside another turn's ``generate`` until the block ends, so that the
    turns started meanwhile all wait together."""
    inside, go_on = threading.Event(), threading.Event()
    blocker = engine.stream(QUESTION, "alpha", GenerationParams(temperature=0.9, seed=1,
                                                                max_new_tokens=4))
    put = blocker.streamer.put

    def held(value) -> None:
        inside.set()
        go_on.wait()
        put(value)

    blocker.streamer.put = held
    running = threading.Thread(target=blocker.complete)
    running.start()
    inside.wait()
    try:
        yield
    finally:
        go_on.set()
        running.join()


@contextlib.contextmanager
def counting_submits(engine) -> Iterator[list[object]]:
    """Each turn handed to the engine's scheduler, once it waits there (the scheduler is busy
    with the blocker of :func:`engine_busy` and starts none of them meanwhile)."""
    submitted: list[object] = []
    submit = engine.scheduler.submit

    def counting(generation) -> None:
        submit(generation)
        submitted.append(generation)

    engine.scheduler.submit = counting
    try:
        yield submitted
    finally:
        del engine.scheduler.submit  # the class's method again


def wait_for_queue(submitted: list[object], count: int) -> None:
    while len(submitted) < count:
        threading.Event().wait(0.005)


def while_busy(engine, turns):
    """Start ``turns`` (persona, params) while the engine is busy; return them finished."""
    generations = [engine.stream(QUESTION, persona, params) for persona, params in turns]
    threads = [threading.Thread(target=g.complete) for g in generations]
    with engine_busy(engine), counting_submits(engine) as submitted:
        for thread in threads:
            thread.start()
        wait_for_queue(submitted, len(turns))
    for thread in threads:
        thread.join()
    return generations


def test_waiting_turns_run_as_one_batch_with_their_own_personas(engine, batches) -> None:
    turns = [("alpha", GREEDY), ("beta", GREEDY), (None, GREEDY), ("beta", GREEDY)]
    done = while_busy(engine, turns)
    assert batches == [4]
    for (persona, _), generation in zip(turns, done, strict=True):
        expected = alone(engine, persona)
        assert generation.text == expected.text
        assert generation.finish_reason == expected.finish_reason
        assert generation.usage.completion_tokens == expected.usage.completion_tokens
        assert generation.usage.prompt_tokens == expected.usage.prompt_tokens
    assert len({g.text for g in done}) > 1


def test_each_row_stops_at_its_own_length(engine, batches) -> None:
    short, long = (GenerationParams(temperature=0, max_new_tokens=n) for n in (3, 12))
    done = while_busy(engine, [("alpha", short), ("beta", long)])
    assert batches == [2]
    assert done[0].text == alone(engine, "alpha", short).text
    assert done[1].text == alone(engine, "beta", long).text
    assert [g.usage.completion_tokens for g in done] == [3, 12]
    assert [g.finish_reason for g in done] == ["length", "length"]


def test_cancelling_one_row_leaves_the_others(engine, batches) -> None:
    long = GenerationParams(temperature=0, max_new_tokens=40)
    leaving, staying = (engine.stream(QUESTION, p, long) for p in ("alpha", "beta"))
    seen: list[str] = []

    def leave_after_one_piece() -> None:
        for piece in leaving:
            seen.append(piece)
            leaving.cancel()

    threads = [threading.Thread(target=leave_after_one_piece),
               threading.Thread(target=staying.complete)]
    with engine_busy(engine), counting_submits(engine) as submitted:
        for thread in threads:
            thread.start()
        wait_for_queue(submitted, 2)
    for thread in threads:
        thread.join()
    assert batches == [2]
    assert leaving.finish_reason == "cancelled" and len(seen) == 1
    expected = alone(engine, "beta", long)
    assert staying.text == expected.text and staying.finish_reason == expected.finish_reason


def test_turns_with_a_seed_or_a_mood_or_other_settings_run_alone(engine, batches) -> None:
    seeded = GenerationParams(temperature=0.8, seed=3, max_new_tokens=6)
    warmer = GenerationParams(temperature=0.5, max_new_tokens=6)
    done = while_busy(engine, [("alpha", seeded), ("beta", seeded), ("alpha", GREEDY),
                               ("beta", warmer)])
    assert batches == []
    assert done[0].text == alone(engine, "alpha", seeded).text


def test_max_batch_one_runs_every_turn_alone(tiny_base: Path, tiny_bundles, batches) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.persona.bundle import Persona

    single = TorchEngine([Persona.from_dir(p) for p in tiny_bundles.values()],
                         base=str(tiny_base), max_batch=1)
    done = while_busy(single, [("alpha", GREEDY), ("beta", GREEDY)])
    assert batches == []
    assert [g.text for g in done] == [alone(single, p).text for p in ("alpha", "beta")]
