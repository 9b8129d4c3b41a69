"""G rows: what grammar-constrained decoding (a response format) costs: decode tokens/s with
a JSON schema's grammar against free decoding, on the torch and the llama.cpp engines."""

from __future__ import annotations

import statistics
from typing import Any

from bench.cast import Cast
from bench.common import Config, Row, collect

# a list long enough that greedy decoding runs to the token limit under the grammar too
SCHEMA = {"type": "object", "properties": {"crew": {
    "type": "array", "minItems": 64, "items": {"type": "string", "maxLength": 24}}},
    "required": ["crew"], "additionalProperties": False}
PROMPT = [{"role": "user", "content": "List the crew of a large sailing ship as JSON."}]


def generation_rate(engine: Any, persona: str | None, tokens: int, repeats: int,
                    response_format: Any) -> tuple[float, dict[str, Any]]:
    """Greedy reply tokens/s through ``engine.generate`` (prefill included, the same for both
    sides), median of ``repeats`` after a warm-up; the details say how many tokens each
    reply had (both sides should run to the limit)."""
    from hyperlex.generation import GenerationParams

    params = GenerationParams(temperature=0, max_new_tokens=tokens)
    samples, counts = [], []
    for _ in range(repeats + 1):
        reply = engine.generate(PROMPT, persona, params, response_format=response_format)
        samples.append(reply.usage.completion_tokens / reply.seconds)
        counts.append(reply.usage.completion_tokens)
    return statistics.median(samples[1:]), {"tok_s": samples[1:], "tokens": counts[1:]}


def grammar_rows(config: Config, cast: Cast) -> list[Row]:
    from hyperlex.engines.registry import engine_entry
    from hyperlex.structured import ResponseFormat

    fmt = ResponseFormat.json_schema(SCHEMA)
    tokens = max(config.max_new_tokens, 16)
    engine = cast.engine(1)
    persona = cast.personas(1)[0].name
    rows = [_row("G1", "torch: decode with a JSON-schema grammar (vs free)", engine, persona,
                 tokens, config.repeats, fmt)]
    cast.release()
    if engine_entry("llamacpp").available():
        from bench.llamacpp import llama_threads
        from hyperlex.engines.llamacpp.engine import LlamaCppEngine

        llama = LlamaCppEngine(cast.personas(1), base=config.base, progress=False,
                               threads=llama_threads())
        rows.append(_row("G2", "llama.cpp: decode with a JSON-schema grammar (vs free)", llama,
                         persona, tokens, config.repeats, fmt))
        llama.close()
        collect()
    return rows


def _row(row_id: str, what: str, engine: Any, persona: str, tokens: int, repeats: int,
         fmt: Any) -> Row:
    free, free_details = generation_rate(engine, persona, tokens, repeats, None)
    held, held_details = generation_rate(engine, persona, tokens, repeats, fmt)
    return Row(row_id, what, held, free, unit="tok/s", alt_label="free", ratio=held / free,
               target=">= 0.8x", met=held / free >= 0.8,
               details={"limit": tokens, "free": free_details, "grammar": held_details})
