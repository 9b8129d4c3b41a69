"""Bench row L7 over llama.cpp's prefill block sizes, and under the rule before blocks (any
cached token reused, the rest decoded in one batch), in one run on the embedded model:
``python -m bench.prefill_blocks``. docs/llamacpp.md keeps the table."""

from __future__ import annotations

from typing import Any

from bench.llamacpp import follow_up_prefill_seconds, llama_threads

SIZES = (64, 32, 16, 8)
REPEATS = 5


def token_exact_prefill(slot: Any, prompt: list[int]) -> None:
    """The rule before blocks: reuse every cached token the prompt starts with."""
    keep = 0
    limit = min(len(slot.tokens), len(prompt) - 1)
    while keep < limit and slot.tokens[keep] == prompt[keep]:
        keep += 1
    if keep < len(slot.tokens):
        slot.truncate(keep)
    slot.decode(prompt[keep:])
    slot.reusable = len(slot.tokens)


def main() -> None:
    from hyperlex.engines.llamacpp import contexts
    from hyperlex.engines.llamacpp import engine as llama
    from hyperlex.host import Host

    philosopher = Host().personas["philosopher"]
    engine = llama.LlamaCppEngine([philosopher], progress=False, threads=llama_threads())
    default, block_prefill = contexts.PREFILL_BLOCK, contexts.Slot.prefill
    print("rule              | cached s | whole s | whole / cached")
    try:
        contexts.Slot.prefill = token_exact_prefill  # type: ignore[method-assign]
        cached, whole, _ = follow_up_prefill_seconds(engine, "philosopher", REPEATS)
        print(f"token-exact       | {cached:8.3f} | {whole:7.3f} | {whole / cached:.1f}x")
        contexts.Slot.prefill = block_prefill  # type: ignore[method-assign]
        for size in SIZES:
            contexts.PREFILL_BLOCK = size
            cached, whole, _ = follow_up_prefill_seconds(engine, "philosopher", REPEATS)
            print(f"blocks of {size:<7} | {cached:8.3f} | {whole:7.3f} | {whole / cached:.1f}x")
    finally:
        contexts.PREFILL_BLOCK, contexts.Slot.prefill = default, block_prefill
        engine.close()


if __name__ == "__main__":
    main()
