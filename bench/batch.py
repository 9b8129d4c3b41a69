"""P3: four turns for four different personas in one generate_batch vs four sequential."""

from __future__ import annotations

import statistics
import time

from bench.cast import Cast
from bench.common import Config, Row

PROMPTS = (
    "What is time?",
    "Write two lines about the sea at night.",
    "How do I boil an egg?",
    "Why do we dream?",
)


def mixed_batch(config: Config, cast: Cast) -> list[Row]:
    from hyperlex.generation import GenerationParams

    count = len(PROMPTS)  # four distinct adapters resident (p00..p03)
    engine = cast.engine(count)
    personas = [p.name for p in cast.personas(count)][: len(PROMPTS)]
    requests = [([{"role": "user", "content": text}], name)
                for text, name in zip(PROMPTS, personas, strict=True)]
    params = GenerationParams(temperature=0, max_new_tokens=config.max_new_tokens)

    def sequential() -> list[str]:
        return [engine.generate(messages, name, params).text for messages, name in requests]

    def batched() -> list[str]:
        return [c.text for c in engine.generate_batch(requests, params)]

    seq_texts, batch_texts = sequential(), batched()  # warm-up, and the texts compared
    seq_s, batch_s = [], []
    for _ in range(config.repeats):
        start = time.perf_counter()
        sequential()
        seq_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched()
        batch_s.append(time.perf_counter() - start)
    ours, theirs = statistics.median(batch_s), statistics.median(seq_s)
    # the streamed path holds back a trailing incomplete UTF-8 character, a whole decode
    # keeps it as U+FFFD: compare the texts without it
    same = [t.rstrip("\ufffd") for t in seq_texts] == [t.rstrip("\ufffd") for t in batch_texts]
    ratio = theirs / ours
    return [Row("P3", f"mixed batch: {len(requests)} personas in one generate_batch",
                ours, theirs, unit="s", alt_label="sequential", ratio=ratio,
                target=">= 2x, same text", met=ratio >= 2 and same,
                details={"identical_texts": same,
                         "identical_raw_texts": seq_texts == batch_texts,
                         "batch_texts": batch_texts,
                         "sequential_texts": seq_texts, "personas": personas,
                         "max_new_tokens": config.max_new_tokens,
                         "batch_s": batch_s, "sequential_s": seq_s})]
