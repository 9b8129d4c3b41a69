"""S rows: ``agent serve`` under load (issue 10). Fifty streaming requests spread over the
personas arrive at once; each reply must be the one its persona gives when asked alone (greedy
decoding, so any mixed adapter or crossed stream shows up as a different text), and throughput
and latency percentiles are measured against the same requests sent one after another. A reply
that differs is judged by likelihood under every persona's adapter on the torch engine: a
near-tie that went the other way is still its own persona's, a mix is not.

On the embedded model, S1-S3 run the installed personas on llama.cpp as ``agent serve`` does
by default (4 contexts, each decoding up to 8 turns of one persona together); the same burst
also runs with batching off (one turn per context), and S2b/S3b are the ratios side by side.
S4-S6 are the same on the torch engine, whose waiting turns are batched
(``hyperlex.engines.torch.batching``). S7 is the best case for batching (50 streams of one
persona) and S8 the worst (50 streams over 32 resident personas, more than the contexts can
hold at once). With ``--base DIR`` (or the tests' bundles), or without llama-cpp-python,
S1-S3 are the torch engine's and there are no others. ``--quick`` sends 12 requests instead of
50.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from bench.cast import Cast
from bench.common import Config, Row
from bench.serve_floor import counting_decodes, floors, token_costs

REQUESTS = 50
PARALLEL = 4  # llama.cpp contexts: agent serve's default
SEQUENCES = 8  # turns of one persona each context decodes together: agent serve's default
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


def _rank(count: int, q: float) -> int:
    """The place (from 1) of the ``q``-th percentile among ``count`` sorted values."""
    return min(count, max(1, round(q / 100 * count)))


def _percentile(values: list[float], q: float) -> float:
    return sorted(values)[_rank(len(values), q) - 1]


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


def llamacpp_service(sequences: int = SEQUENCES, personas: list[Any] | None = None,
                     contexts: int = PARALLEL) -> tuple[Any, Any, str]:
    """``agent serve``'s llama.cpp engine on the installed cast, or on ``personas``."""
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine
    from hyperlex.host import Host
    from hyperlex.plugins import builtin_encoders
    from hyperlex.serve.server import PersonaService

    if personas is None:
        host = Host()
        personas = list(host.personas.values())
    else:
        host = Host(extra_plugins={"encoders": builtin_encoders}, entry_points=False)
    engine = LlamaCppEngine(personas, contexts=contexts, sequences=sequences, progress=False)
    batching = f"{sequences} turns each" if sequences > 1 else "batching off"
    return (PersonaService(host, engine, router=None), engine,
            f"llama.cpp, {contexts} contexts, {batching}")


def serve_load(config: Config, cast: Cast) -> list[Row]:
    """S1-S3 on what ``agent serve`` runs by default here (llama.cpp on the embedded model,
    when installed) with the batching-off burst beside it (S2b, S3b); S4-S6 the same on the
    torch engine, whose waiting turns are batched; S7 and S8 one persona and 32."""
    from hyperlex.engines.registry import engine_entry

    count = 12 if config.quick else REQUESTS
    real = config.base is None and not config.bundles
    torch_run = _load(torch_service(config, cast), count, config.max_new_tokens)
    if not (real and engine_entry("llamacpp").available()):
        return _rows("S1", torch_run, lambda: torch_run.engine)

    def judge() -> Any:
        return torch_run.engine

    on = _load(llamacpp_service(), count, config.max_new_tokens, floor=True)
    off = _load(llamacpp_service(sequences=1), count, config.max_new_tokens, alone=on)
    wide = _load(llamacpp_service(contexts=len({p for p, _ in on.jobs})), count,
                 config.max_new_tokens, alone=on)
    rows = _rows("S1", on, judge)
    rows += _floor_rows(on, judge)
    rows += _versus_off(on, off, judge)
    rows.append(_one_context_each(on, wide, judge))
    rows += _rows("S4", torch_run, judge)
    one = _load(llamacpp_service(), count, config.max_new_tokens, only=on.jobs[0][0])
    rows.append(_best_or_worst("S7", one, judge, "one persona"))
    many = _load(llamacpp_service(personas=cast.personas(config.personas)), count,
                 config.max_new_tokens)
    rows.append(_best_or_worst("S8", many, lambda: cast.engine(config.personas),
                               f"{config.personas} resident personas"))
    return rows


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
    floor: dict[str, Any] | None = None  # bench.serve_floor's numbers for the burst
    checked: Outcome | None = None  # _outcome's, kept: judging a reply runs the torch engine


def _load(service_engine_what: tuple[Any, Any, str], count: int, max_tokens: int,
          alone: LoadRun | None = None, only: str | None = None, floor: bool = False
          ) -> LoadRun:
    """The same ``count`` requests one after another, then all at once; with ``alone``,
    the one-after-another replies are that run's (same requests, another server); with
    ``only``, every request goes to that persona; with ``floor`` (llama.cpp), the burst's
    decodes are counted and the engine's costs per token measured after it
    (:mod:`bench.serve_floor`)."""
    import openai

    from hyperlex.serve.http import Server

    service, engine, what = service_engine_what
    personas = [only] if only else service.speakers
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
            if alone is None:
                start = time.perf_counter()
                replies = [_ask(client, persona, prompt, max_tokens) for persona, prompt in jobs]
                sequential_s = time.perf_counter() - start
            else:
                replies, sequential_s = alone.alone, alone.sequential_s
            with counting_decodes() if floor else nullcontext() as counts:
                start = time.perf_counter()
                together = _concurrently(client, jobs, max_tokens)
                concurrent_s = time.perf_counter() - start
        floor_numbers = None if counts is None else floors(
            counts, token_costs(engine, personas[0]), count, _rank(count, 95))
    finally:
        del engine.stream
        if hasattr(engine, "close"):
            engine.close()
    return LoadRun(jobs, replies, together, sequential_s, concurrent_s, what, max_tokens,
                   prompts, engine, floor_numbers)


def _judge(run: LoadRun, scorer: Callable[[], Any], reply: Reply, expected: str
           ) -> dict[str, Any]:
    """A reply that differs from its persona's reply alone: which persona's adapter makes it
    most likely (mean log-likelihood per token, on the torch engine, given the prompt the
    server built)? Its own, when it is a near-tie decided otherwise (llama.cpp's numbers
    depend on how the prompt's cache was filled); another one, when personas were mixed."""
    messages = run.prompts[(reply.persona, reply.prompt)]
    scores = {}
    for persona in sorted({p for p, _ in run.jobs}):
        nll, tokens = scorer().reply_nll(messages, reply.text, persona)
        scores[persona] = nll / max(tokens, 1)
    shared = next((i for i, (a, b) in enumerate(zip(reply.text, expected, strict=False))
                   if a != b), min(len(reply.text), len(expected)))
    return {"persona": reply.persona, "prompt": reply.prompt, "expected": expected,
            "got": reply.text, "shared_prefix_chars": shared,
            "most_likely_under": min(scores, key=scores.__getitem__),
            "nll_per_token": {p: round(v, 4) for p, v in scores.items()}}


@dataclass
class Outcome:
    """A burst's replies checked against the same requests alone, and its numbers."""

    matched: int
    exact: int
    own: list[dict[str, Any]]
    mixed: list[dict[str, Any]]
    throughput: float
    seq_throughput: float
    ttft_p95: float
    alone_ttft: float
    details: dict[str, Any]


def _outcome(run: LoadRun, scorer: Callable[[], Any]) -> Outcome:
    """``run``'s burst checked against its replies alone (once per run: several rows read
    the same run)."""
    if run.checked is None:
        run.checked = _check(run, scorer)
    return run.checked


def _check(run: LoadRun, scorer: Callable[[], Any]) -> Outcome:
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
    distinct = sum(len(set(texts.values())) == len(texts) for texts in by_prompt.values())
    errors = [r.error for r in (*alone, *together) if r.error]
    tokens = sum(r.tokens for r in together)
    ttft = [r.ttft for r in together]
    latency = [r.latency for r in together]
    alone_ttft = statistics.median(r.ttft for r in alone)
    details = {
        "server": run.what, "requests": len(jobs), "personas": sorted({p for p, _ in jobs}),
        "max_tokens": run.max_tokens, "matched": len(exact) + len(own),
        "identical": len(exact), "differing_but_own_persona": own, "mixed": mixed,
        "errors": errors[:5],
        "prompts_where_every_persona_differs": f"{distinct}/{len(by_prompt)}",
        "concurrent_s": round(run.concurrent_s, 3), "sequential_s": round(run.sequential_s, 3),
        "completion_tokens": tokens,
        "ttft_s": {f"p{q}": round(_percentile(ttft, q), 3) for q in (50, 90, 95, 99)},
        "latency_s": {f"p{q}": round(_percentile(latency, q), 3) for q in (50, 90, 95, 99)},
        "alone_ttft_p50_s": round(alone_ttft, 3),
    }
    return Outcome(len(exact) + len(own), len(exact), own, mixed, tokens / run.concurrent_s,
                   sum(r.tokens for r in alone) / run.sequential_s, _percentile(ttft, 95),
                   alone_ttft, details)


def _rows(first: str, run: LoadRun, scorer: Callable[[], Any]) -> list[Row]:
    ids = [f"S{int(first[1:]) + i}" for i in range(3)]
    engine = run.what.split(",")[0]
    out = _outcome(run, scorer)
    requests = out.details["requests"]
    ratio = out.ttft_p95 / out.alone_ttft
    batched = "turns each" in run.what
    return [
        Row(ids[0], f"{engine}: {requests} concurrent streams answered by their persona",
            float(out.matched), float(requests), "", "requests", out.matched / requests, "= 1",
            out.matched == requests and not out.mixed,
            f"{out.exact} identical, {len(out.own)} near-tie, {len(out.mixed)} mixed",
            out.details),
        Row(ids[1], f"{engine}: served tokens/s, concurrent vs one at a time", out.throughput,
            out.seq_throughput, "tok/s", "sequential", out.throughput / out.seq_throughput,
            ">= 3x" if batched else ">= 1", out.throughput / out.seq_throughput
            >= (3 if batched else 1), details=out.details),
        Row(ids[2], f"{engine}: time to first token p95 under load vs alone (p50)",
            out.ttft_p95, out.alone_ttft, "s", "alone", ratio, "<= 25x" if batched else "",
            ratio <= 25 if batched else None, details=out.details),
    ]


def _floor_rows(run: LoadRun, scorer: Callable[[], Any]) -> list[Row]:
    """S2f, S3f: the best S2 and S3 this machine's arithmetic allows for the burst just
    served (bench.serve_floor)."""
    if run.floor is None:
        return []
    floor, out = run.floor, _outcome(run, scorer)
    sequential, alone = out.seq_throughput, out.alone_ttft
    ceiling = out.details["completion_tokens"] / floor["burst_floor_s"]
    work = (f"{floor['prefill_tokens']} prompt tokens at {floor['prefill_ms_per_token']} ms, "
            f"{floor['step_tokens']} step tokens at {floor['step_ms_per_token']} ms")
    return [
        Row("S2f", "llama.cpp: most served tokens/s this CPU allows for S2's burst (vs one "
            "at a time)", ceiling, sequential, "tok/s", "sequential", ceiling / sequential,
            note=f"S2 reached {out.throughput / ceiling:.0%} of it; {work}",
            details=floor),
        Row("S3f", "llama.cpp: least p95 time to first token this CPU allows for S3's burst "
            "(vs alone)", floor["ttft_p95_floor_s"], alone, "s", "alone",
            floor["ttft_p95_floor_s"] / alone,
            note=f"S3's p95 was {out.ttft_p95 / floor['ttft_p95_floor_s']:.2f}x this floor",
            details=floor),
    ]


def _versus_off(on: LoadRun, off: LoadRun, scorer: Callable[[], Any]) -> list[Row]:
    """S2b, S3b: the burst with batching on against the same burst with batching off."""
    batched, single = _outcome(on, scorer), _outcome(off, scorer)
    details = {"batching_off": single.details}
    note = (f"off: {single.exact} identical, {len(single.own)} near-tie, "
            f"{len(single.mixed)} mixed")
    return [
        Row("S2b", "llama.cpp: served tokens/s under the burst, batching on vs off",
            batched.throughput, single.throughput, "tok/s", "batching off",
            batched.throughput / single.throughput, "", None, note, details),
        Row("S3b", "llama.cpp: time to first token p95 under the burst, batching on vs off",
            batched.ttft_p95, single.ttft_p95, "s", "batching off",
            batched.ttft_p95 / single.ttft_p95, "<= 0.4x",
            batched.ttft_p95 / single.ttft_p95 <= 0.4, note, details),
    ]


def _one_context_each(on: LoadRun, wide: LoadRun, scorer: Callable[[], Any]) -> Row:
    """S3p: the burst on a server with a context for every persona in it, against S3's."""
    default, each = _outcome(on, scorer), _outcome(wide, scorer)
    return Row("S3p", "llama.cpp: p95 time to first token with a context per persona (vs "
               f"{PARALLEL} contexts)", each.ttft_p95, default.ttft_p95, "s",
               f"{PARALLEL} contexts", each.ttft_p95 / default.ttft_p95, "", None,
               f"{each.matched}/{each.details['requests']} answered by their persona "
               f"({len(each.mixed)} mixed); {each.ttft_p95 / each.alone_ttft:.1f}x alone; "
               f"{each.throughput:.1f} tok/s", {"one_context_each": each.details})


def _best_or_worst(row: str, run: LoadRun, scorer: Callable[[], Any], what: str) -> Row:
    out = _outcome(run, scorer)
    return Row(row, f"llama.cpp: served tokens/s, {out.details['requests']} streams over "
               f"{what} (vs one at a time)", out.throughput, out.seq_throughput, "tok/s",
               "sequential", out.throughput / out.seq_throughput, "", None,
               f"{out.matched}/{out.details['requests']} answered by their persona "
               f"({len(out.mixed)} mixed); p95 first token {out.ttft_p95:.2f} s "
               f"(alone {out.alone_ttft:.2f} s)", out.details)
