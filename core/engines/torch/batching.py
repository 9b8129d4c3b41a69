"""Streamed turns on the torch engine, run together when they wait together.

The engine runs one ``generate`` at a time (its lock). Turns that arrive while it is busy
wait here; when it is free, the oldest starts, and every waiting turn that can share its
``generate`` call joins it as one more row: each row keeps its own persona (PEFT's per-row
``adapter_names``), its own reply length, its own cancel and its own token stream. A batch
of personas decodes in about the time of one (bench P3), so a server under load answers
several turns for the price of one. Turns with mood layers, a seed or a response format run
alone: a mood is a composition a row cannot have on its own, a seed fixes the random stream
of one call, and a grammar is held per call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from hyperlex.engines.torch.generation import (
    TorchGeneration,
    eos_ids,
    generate_kwargs,
)
from hyperlex.generation import finish_reason

if TYPE_CHECKING:
    from hyperlex.engines.torch.engine import TorchEngine


class Scheduler:
    """One worker thread that starts waiting generations, up to ``max_batch`` at a time."""

    def __init__(self, engine: TorchEngine, max_batch: int):
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self._waiting: list[TorchGeneration] = []
        self._ready = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, generation: TorchGeneration) -> None:
        with self._ready:
            self._waiting.append(generation)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, daemon=True,
                                                name="hyperlex-torch-scheduler")
                self._worker.start()
            self._ready.notify()

    def _next(self) -> list[TorchGeneration]:
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            first = self._waiting.pop(0)
            batch = [first]
            key = batch_key(first)
            if key is not None:
                for waiting in list(self._waiting):
                    if len(batch) == self.max_batch:
                        break
                    if batch_key(waiting) == key:
                        batch.append(waiting)
                        self._waiting.remove(waiting)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next()
            for generation in [g for g in batch if g.cancelled]:  # gone before it started
                generation.release()
            batch = [g for g in batch if not g.cancelled]
            if len(batch) == 1:
                batch[0].run()
            elif batch:
                run_batch(self.engine, batch)


def batch_key(generation: TorchGeneration) -> Any:
    """What rows of one ``generate`` call must share (None: the turn runs alone)."""
    params = generation.params
    if generation.layers or params.seed is not None or generation.response_format:
        return None
    return replace(params, max_new_tokens=0)


def run_batch(engine: TorchEngine, generations: list[TorchGeneration]) -> None:
    try:
        tokenizer = engine.tokenizer
        input_ids, attention = engine.left_padded([g.prompt_ids for g in generations])
        limits = [g.params.max_new_tokens for g in generations]
        params = replace(generations[0].params, max_new_tokens=max(limits))
        rows_out = _Rows(generations, set(eos_ids(tokenizer, engine.inner_model)), limits)
        kwargs = generate_kwargs(params, tokenizer, input_ids.shape[1])
        start = time.perf_counter()
        engine.generate_rows(input_ids, attention, [g.persona for g in generations],
                             streamer=rows_out, stopping_criteria=[rows_out], **kwargs)
        seconds = time.perf_counter() - start
        for i, generation in enumerate(generations):
            generation.usage.completion_tokens = rows_out.counts[i]
            generation.seconds = seconds
            generation.finish_reason = generation.finish_reason or finish_reason(
                rows_out.counts[i], limits[i], ended=rows_out.ended[i],
                cancelled=generation.cancelled)
    except BaseException as exc:  # re-raised in each consuming thread
        for generation in generations:
            generation.error = exc
    finally:
        for generation in generations:
            generation.release()


class _Rows:
    """``generate``'s streamer and stopping criterion for a batch: hands each row's tokens to
    its generation until the row ends (end-of-turn token, its own length, or a cancel)."""

    def __init__(self, generations: list[TorchGeneration], eos: set[int], limits: list[int]):
        self.generations = generations
        self.eos = eos
        self.limits = limits
        self.counts = [0] * len(generations)
        self.ended = [False] * len(generations)  # by an end-of-turn token
        self.done = [False] * len(generations)
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first sends the prompts
            self._prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            generation = self.generations[i]
            if generation.cancelled:
                self.done[i] = True
                continue
            self.counts[i] += 1
            generation.streamer.add([token])
            if token in self.eos:
                self.ended[i] = self.done[i] = True
            elif self.counts[i] >= self.limits[i]:
                self.done[i] = True

    def end(self) -> None:
        """Rows are ended by :func:`run_batch`, after their usage is known."""

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = [d or g.cancelled for d, g in zip(self.done, self.generations, strict=True)]
        return torch.tensor(done, dtype=torch.bool)
