"""L rows: the llama.cpp engine beside the transformers engine and bare llama.cpp (issue 8):
switch cost, decode speed with a persona active, the bandwidth floor, time to first token."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from bench.cast import Cast
from bench.cold import agent_command, first_byte_seconds
from bench.common import Config, Row, collect
from bench.decode import PROMPT, copy_bandwidth, decode_rate

SWITCHES = 200


def llama_decode_rate(engine: Any, persona: str | None, tokens: int,
                      repeats: int) -> tuple[float, list[float]]:
    """Batch-1 greedy decode tokens/s on one context: ``tokens`` forced steps after the
    prompt's prefill (end-of-turn tokens do not stop it), median of ``repeats``."""
    import numpy as np

    prompt = engine.encode(PROMPT)
    samples = []
    with engine.slot() as slot:
        for _ in range(repeats + 1):  # the first is a warm-up
            slot.switch((persona, ()))
            slot.prefill(prompt)
            start = time.perf_counter()
            for _ in range(tokens):
                slot.decode([int(np.argmax(slot.logits()))])
            samples.append(tokens / (time.perf_counter() - start))
    return statistics.median(samples[1:]), samples[1:]


def switch_seconds(engine: Any, names: list[str], calls: int) -> tuple[float, float]:
    """Median seconds of setting another persona's adapter on a context, and of the first
    one-token decode after a switch minus a decode without one (llama.cpp rebuilds its graph)."""
    with engine.slot() as slot:
        compositions = [(name, ()) for name in names]
        slot.switch(compositions[0])
        slot.prefill(engine.encode(PROMPT))
        sets, after, plain = [], [], []
        for i in range(calls):
            composition = compositions[(i + 1) % len(compositions)]
            start = time.perf_counter()
            slot.set_adapters(composition)
            sets.append(time.perf_counter() - start)
            start = time.perf_counter()
            slot.decode([slot.tokens[-1]])
            after.append(time.perf_counter() - start)
            start = time.perf_counter()
            slot.decode([slot.tokens[-1]])
            plain.append(time.perf_counter() - start)
            if len(slot.tokens) > engine.context_length - 8:
                slot.truncate(16)
        slot.forget()  # the cache above is scratch: never reuse it for a turn
    return statistics.median(sets), statistics.median(after) - statistics.median(plain)


FOLLOW_UP = [{"role": "system", "content": "You are a philosopher. The scene: " + ", ".join(
    f"the {w} is near the sea" for w in ("lighthouse", "sailor", "harbour", "gull", "storm",
                                         "rope", "anchor", "tide", "keeper", "lamp") * 4)},
             {"role": "user", "content": "What does the keeper think of the sea?"}]


def follow_up_prefill_seconds(engine: Any, persona: str, repeats: int
                              ) -> tuple[float, float, dict[str, int]]:
    """Median seconds to prefill a conversation's second turn on the context that served its
    first (its prompt and the reply, decoded token by token, cached), and the same prompt on
    an empty context."""
    first = engine.encode(FOLLOW_UP)
    answer = "The keeper says the sea is patient, and so must he be, night after night."
    reply = engine.llama.tokenize(answer.encode(), add_bos=False, special=False)
    second = engine.encode([*FOLLOW_UP, {"role": "assistant", "content": answer},
                            {"role": "user", "content": "And the gull?"}])
    cached, whole = [], []
    with engine.slot() as slot:
        slot.switch((persona, ()))
        for _ in range(repeats + 1):  # the first is a warm-up
            slot.truncate(0)
            slot.prefill(first)
            for token in reply:
                slot.decode([token])
            start = time.perf_counter()
            slot.prefill(second)
            cached.append(time.perf_counter() - start)
            slot.truncate(0)
            start = time.perf_counter()
            slot.prefill(second)
            whole.append(time.perf_counter() - start)
        slot.forget()  # scratch: never reuse it for a turn
    sizes = {"first_prompt_tokens": len(first), "second_prompt_tokens": len(second)}
    return statistics.median(cached[1:]), statistics.median(whole[1:]), sizes


def llamacpp_rows(config: Config, cast: Cast) -> list[Row]:
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine
    from hyperlex.engines.registry import engine_entry

    if not engine_entry("llamacpp").available():
        note = "skipped: llama-cpp-python not installed (pip install 'hyperlex[llamacpp]')"
        return [Row(pid, what, target=target, note=note) for pid, what, target in (
            ("L1", "llama.cpp persona switch", "-"),
            ("L2", "llama.cpp decode with a persona (vs bare llama.cpp)", ">= 0.8x"),
            ("L2t", "llama.cpp decode with a persona (vs transformers engine)", ">= 4x"),
            ("L5", "llama.cpp cold start: agent chat -m to first byte", "< 1.5 s"),
            ("L7", "llama.cpp follow-up turn prefill, cached prefix (vs whole prompt)",
             ">= 2x"))]
    tokens = max(config.max_new_tokens, 8)
    personas = cast.personas(config.personas)
    engine = LlamaCppEngine(personas, base=config.base, progress=False,
                            threads=llama_threads())
    if engine.skipped:
        raise SystemExit("personas not attached in llama.cpp: "
                         + "; ".join(engine.skipped.values()))
    names = [p.name for p in personas]
    set_s, first_decode_extra_s = switch_seconds(engine, names, min(SWITCHES, config.switches))
    bare, bare_samples = llama_decode_rate(engine, None, tokens, config.repeats)
    active, active_samples = llama_decode_rate(engine, names[0], tokens, config.repeats)
    cached_s, whole_s, sizes = follow_up_prefill_seconds(engine, names[0], config.repeats)
    size = engine.model_path.stat().st_size
    engine.close()
    del engine
    collect()
    torch_engine = cast.engine(1)
    torch_rate, _ = decode_rate(torch_engine, names[0], tokens, config.repeats)
    bandwidth, _ = copy_bandwidth(config.repeats)
    floor = bandwidth / size
    rows = [
        Row("L1", f"llama.cpp persona switch, {len(names)} resident", set_s, unit="s",
            target="-", details={"first_decode_after_switch_extra_s": first_decode_extra_s}),
        Row("L2", "llama.cpp decode with a persona (vs bare llama.cpp)", active, bare,
            unit="tok/s", alt_label="bare llama.cpp", ratio=active / bare, target=">= 0.8x",
            met=active / bare >= 0.8, details={"active": active_samples, "bare": bare_samples}),
        Row("L2t", "llama.cpp decode with a persona (vs transformers engine)", active,
            torch_rate, unit="tok/s", alt_label="transformers", ratio=active / torch_rate,
            target=">= 4x", met=active / torch_rate >= 4),
        Row("L6", "llama.cpp bare decode vs bandwidth floor (GGUF bytes)", bare, floor,
            unit="tok/s", alt_label="floor", ratio=bare / floor, target="-",
            details={"gguf_bytes": size, "copy_bandwidth_bytes_s": bandwidth}),
        Row("L7", "llama.cpp follow-up turn prefill, cached prefix (vs whole prompt)",
            cached_s, whole_s, unit="s", alt_label="whole prompt", ratio=whole_s / cached_s,
            target=">= 2x", met=whole_s / cached_s >= 2, details=sizes),
    ]
    return rows + [cold_start_row(config)]


def cold_start_row(config: Config) -> Row:
    what = "llama.cpp cold start: agent chat -m to first byte"
    if config.base is not None:
        return Row("L5", what, target="< 1.5 s",
                   note="skipped: needs the embedded base (no --base)")
    env = dict(os.environ)
    chat = [*agent_command(), "chat", "-p", "philosopher", "-m", "Hi", "-o", "max_new_tokens",
            "1", "-o", "temperature", "0", "--no-store", "--engine", "llamacpp"]
    first_byte_seconds(chat, env)  # converts the adapters once and warms the file cache
    seconds = statistics.median(first_byte_seconds(chat, env) for _ in range(config.repeats))
    return Row("L5", what, seconds, unit="s", target="< 1.5 s", met=seconds < 1.5,
               details={"command": chat})


def llama_threads() -> int | None:
    import torch

    return torch.get_num_threads()
