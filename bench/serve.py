"""S rows: ``agent serve`` under load (issue 10). Fifty streaming requests spread over the
personas arrive at once; each reply must be the one its persona gives when asked alone (greedy
decoding, so any mixed adapter or crossed stream shows up as a different text), and throughput
and latency percentiles are measured against the same requests sent one after another. A reply
that differs is judged by likelihood under every persona's adapter on the torch engine: a
near-tie that went the other way is still its own persona's, a mix is not.

On the embedded model, S1-S3 run the installed personas on llama.cpp with a pool of
contexts (what ``agent serve`` does by default) and S4-S6 the same on the torch engine, whose
waiting turns are batched (``hyperlex.engines.torch.batching``); with ``--base DIR`` (or the tests'
bundles), or without llama-cpp-python, S1-S3 are the torch engine's. ``--quick`` sends 12
requests instead of 50.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench.cast import Cast
from bench.common import Config, Row

REQUESTS = 50
PARALLEL = 4  # llama.cpp contexts: agent serve's default
PROMPTS = ("What is time?", "Why do we dream?", "Is a promise binding?", "Describe the sea.",
           "What is a proof?", "How do plants grow?", "What makes a good question?",
           "Can machines think?", "What is courage?", "Why is the sky blue?")


@dataclass
class Reply:
    persona: str
    prompt: str
    model: str = ""
    text: str = ""
    start: float = 0.0
    first: float = 0.0
    end: float = 0.0
    tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.first - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start


def _ask(client: Any, persona: str, prompt: str, max_tokens: int) -> Reply:
    reply = Reply(persona, prompt, start=time.perf_counter())
    try:
        stream = client.chat.completions.create(
            model=persona, messages=[{"role": "user", "content": prompt}], stream=True,
            max_tokens=max_tokens, temperature=0, stream_options={"include_usage": True})
        for chunk in stream:
            reply.model = chunk.model
            if chunk.usage is not None:
                reply.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if not reply.first:
                        reply.first = time.perf_counter()
                    reply.text += choice.delta.content
    except Exception as exc:  # recorded: a failed request is a result of the load test
        reply.error = f"{type(exc).__name__}: {exc}"
    reply.end = time.perf_counter()
    reply.first = reply.first or reply.end
    return reply


def _concurrently(client: Any, jobs: list[tuple[str, str]], max_tokens: int) -> list[Reply]:
    replies: list[Reply | None] = [None] * len(jobs)
    gate = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        gate.wait()
        replies[i] = _ask(client, *jobs[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in replies if r is not None]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def torch_service(config: Config, cast: Cast) -> tuple[Any, Any, str]:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.host import Host
    from hyperlex.plugins import builtin_encoders
    from hyperlex.serve.server import PersonaService

    if config.base is None and not config.bundles:  # the installed cast, as agent serve has it
        host = Host()
        personas = list(host.personas.values())
    else:
        host = Host(extra_plugins={"encoders": builtin_encoders}, entry_points=False)
        personas = cast.personas(min(config.personas, 6))
    engine = TorchEngine(personas, base=config.base, progress=False, max_batch=PARALLEL)
    return (PersonaService(host, engine, router=None), engine,
            f"torch engine, batches of up to {PARALLEL}")


def llamacpp_service() -> tuple[Any, Any, str]:
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine
    from hyperlex.host import Host
    from hyperlex.serve.server import PersonaService

    host = Host()
    engine = LlamaCppEngine(list(host.personas.values()), contexts=PARALLEL, progress=False)
    return PersonaService(host, engine, router=None), engine, f"llama.cpp, {PARALLEL} contexts"


def serve_load(config: Config, cast: Cast) -> list[Row]:
    """S1-S3 on what ``agent serve`` runs by default here (llama.cpp on the embedded model,
    when installed); S4-S6 the same on the torch engine, whose waiting turns are batched."""
    from hyperlex.engines.registry import engine_entry

    available = engine_entry("llamacpp").available

    count = 12 if config.quick else REQUESTS
    real = config.base is None and not config.bundles
    llama = _load(llamacpp_service(), count, config.max_new_tokens) \
        if real and available() else None
    torch_run = _load(torch_service(config, cast), count, config.max_new_tokens)
    rows = []
    if llama is not None:  # the torch engine (float32) judges replies that differ
        rows += _rows("S1", llama, torch_run.engine)
    return rows + _rows("S4" if rows else "S1", torch_run, torch_run.engine)


@dataclass
class LoadRun:
    jobs: list[tuple[str, str]]
    alone: list[Reply]
    together: list[Reply]
    sequential_s: float
    concurrent_s: float
    what: str
    max_tokens: int
    prompts: dict[tuple[str, str], list[Any]]  # (persona, question) -> the prompt it got
    engine: Any


def _load(service_engine_what: tuple[Any, Any, str], count: int, max_tokens: int) -> LoadRun:
    """The same ``count`` requests one after another, then all at once."""
    import openai

    from hyperlex.serve.http import Server

    service, engine, what = service_engine_what
    personas = service.speakers
    jobs = [(personas[i % len(personas)], PROMPTS[i % len(PROMPTS)]) for i in range(count)]
    prompts: dict[tuple[str, str], list[Any]] = {}
    stream = engine.stream

    def recording(messages, persona, *args, **kwargs):
        prompts[(persona, messages[-1]["content"])] = list(messages)
        return stream(messages, persona, *args, **kwargs)

    engine.stream = recording
    try:
        with Server(service, port=0, log=False) as server:
            client = openai.OpenAI(base_url=server.url, api_key="bench", max_retries=0,
                                   timeout=1200)
            _ask(client, personas[0], PROMPTS[0], 2)  # warm-up: graphs, encoders
            start = time.perf_counter()
            alone = [_ask(client, persona, prompt, max_tokens) for persona, prompt in jobs]
            sequential_s = time.perf_counter() - start
            start = time.perf_counter()
            together = _concurrently(client, jobs, max_tokens)
            concurrent_s = time.perf_counter() - start
    finally:
        del engine.stream
        if hasattr(engine, "close"):
            engine.close()
    return LoadRun(jobs, alone, together, sequential_s, concurrent_s, what, max_tokens,
                   prompts, engine)


def _judge(run: LoadRun, scorer: Any, reply: Reply, expected: str) -> dict[str, Any]:
    """A reply that differs from its persona's reply alone: which persona's adapter makes it
    most likely (mean log-likelihood per token, on the torch engine, given the prompt the
    server built)? Its own, when it is a near-tie decided otherwise (llama.cpp's numbers
    depend on how the prompt's cache was filled); another one, when personas were mixed."""
    messages = run.prompts[(reply.persona, reply.prompt)]
    scores = {}
    for persona in sorted({p for p, _ in run.jobs}):
        nll, tokens = scorer.reply_nll(messages, reply.text, persona)
        scores[persona] = nll / max(tokens, 1)
    shared = next((i for i, (a, b) in enumerate(zip(reply.text, expected, strict=False))
                   if a != b), min(len(reply.text), len(expected)))
    return {"persona": reply.persona, "prompt": reply.prompt, "expected": expected,
            "got": reply.text, "shared_prefix_chars": shared,
            "most_likely_under": min(scores, key=scores.__getitem__),
            "nll_per_token": {p: round(v, 4) for p, v in scores.items()}}


def _rows(first: str, run: LoadRun, scorer: Any) -> list[Row]:
    ids = [f"S{int(first[1:]) + i}" for i in range(3)]
    engine = run.what.split(",")[0]
    jobs, alone, together = run.jobs, run.alone, run.together
    expected = {(r.persona, r.prompt): r.text for r in alone}
    by_prompt: dict[str, dict[str, str]] = {}
    for r in alone:
        by_prompt.setdefault(r.prompt, {})[r.persona] = r.text
    exact = [r for r in together if r.text == expected[(r.persona, r.prompt)]
             and r.model == r.persona and not r.error]
    differing = [_judge(run, scorer, r, expected[(r.persona, r.prompt)]) for r in together
                 if r not in exact and not r.error]
    own = [d for d in differing if d["most_likely_under"] == d["persona"]
           and d["got"] not in by_prompt[d["prompt"]].values()]
    mixed = [d for d in differing if d not in own]
    matched = len(exact) + len(own)
    distinct = sum(len(set(texts.values())) == len(texts) for texts in by_prompt.values())
    errors = [r.error for r in (*alone, *together) if r.error]
    tokens = sum(r.tokens for r in together)
    seq_tokens = sum(r.tokens for r in alone)
    concurrent_s, sequential_s = run.concurrent_s, run.sequential_s
    throughput, seq_throughput = tokens / concurrent_s, seq_tokens / sequential_s
    ttft = [r.ttft for r in together]
    latency = [r.latency for r in together]
    alone_ttft = statistics.median(r.ttft for r in alone)
    details = {
        "server": run.what, "requests": len(jobs), "personas": sorted({p for p, _ in jobs}),
        "max_tokens": run.max_tokens, "matched": matched, "identical": len(exact),
        "differing_but_own_persona": own, "mixed": mixed, "errors": errors[:5],
        "prompts_where_every_persona_differs": f"{distinct}/{len(by_prompt)}",
        "concurrent_s": round(concurrent_s, 3), "sequential_s": round(sequential_s, 3),
        "completion_tokens": tokens,
        "ttft_s": {f"p{q}": round(_percentile(ttft, q), 3) for q in (50, 90, 95, 99)},
        "latency_s": {f"p{q}": round(_percentile(latency, q), 3) for q in (50, 90, 95, 99)},
        "alone_ttft_p50_s": round(alone_ttft, 3),
    }
    return [
        Row(ids[0], f"{engine}: {len(jobs)} concurrent streams answered by their persona",
            float(matched), float(len(jobs)), "", "requests", matched / len(jobs), "= 1",
            matched == len(jobs) and not mixed,
            f"{len(exact)} identical, {len(own)} near-tie, {len(mixed)} mixed", details),
        Row(ids[1], f"{engine}: served tokens/s, concurrent vs one at a time", throughput,
            seq_throughput, "tok/s", "sequential", throughput / seq_throughput, ">= 1",
            throughput >= seq_throughput, details=details),
        Row(ids[2], f"{engine}: time to first token p95 under load vs alone (p50)",
            _percentile(ttft, 95), alone_ttft, "s", "alone", _percentile(ttft, 95) / alone_ttft,
            "", None, details=details),
    ]
