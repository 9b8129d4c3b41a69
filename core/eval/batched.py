"""Replies for an evaluation: many (prompt, persona) requests, generated in batches of
``batch_size`` with progress reported after each batch. Every evaluation generates through
here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hyperlex.generation import GenerationParams, Guidance, Layers, Message


def generate_replies(engine: Any, requests: Sequence[tuple[Sequence[Message], str | None]],
                     params: GenerationParams, batch_size: int,
                     progress: Callable[[int, int], None] | None = None,
                     layers: Layers = (), guidance: Guidance | None = None) -> list[str]:
    """The stripped reply text of each request, in order; ``progress(done, total)`` after
    each batch. ``guidance``: scene guidance, its negatives in the requests' order."""
    replies: list[str] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        # asked only when given: an engine from a plugin need not know the argument
        guided = {} if guidance is None else {"guidance": Guidance(
            guidance.weight, guidance.negatives[start:start + batch_size])}
        replies += [c.text.strip()
                    for c in engine.generate_batch(chunk, params, layers=layers, **guided)]
        if progress is not None:
            progress(len(replies), len(requests))
    return replies
