"""H rows: ``agent serve`` with hostile and ordinary clients (issue 19). H1: a request on a
reused keep-alive connection against one on a new connection (the standard library's server
took ~44 ms more on a reused one: headers and body written separately, Nagle's delay). H2:
ten clients chatting while 300 slow connections trickle a request line, against the same ten
on an idle server (the threaded server made 308 threads and slowed a chat 2.9 s -> 12.9 s).

The server runs in-process on loopback with the installed personas on llama.cpp (torch when
llama-cpp-python is absent, or with ``--base``)."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from typing import Any

from bench.cast import Cast
from bench.common import Config, Row

CALLS = 200
SLOW = 300
CLIENTS = 10
CHATS = 3  # per client


def _service(config: Config, cast: Cast) -> Any:
    from bench.serve import llamacpp_service, torch_service
    from hyperlex.engines.registry import engine_entry

    real = config.base is None and not config.bundles
    if real and engine_entry("llamacpp").available():
        return llamacpp_service()
    return torch_service(config, cast)


def _models_ms(url: str, reuse: bool) -> float:
    """Median ms of ``GET /v1/models`` through the ``openai`` client, one client for all
    calls (keep-alive) or a new one per call."""
    import openai

    shared = openai.OpenAI(base_url=url, api_key="bench", max_retries=0)
    shared.models.list()
    samples = []
    for _ in range(CALLS):
        client = shared if reuse else openai.OpenAI(base_url=url, api_key="bench",
                                                     max_retries=0)
        start = time.perf_counter()
        client.models.list()
        samples.append((time.perf_counter() - start) * 1000)
        if not reuse:
            client.close()
    return statistics.median(samples)


def _chat_latencies(url: str, persona: str) -> list[float]:
    import openai

    latencies: list[float] = []

    def client() -> None:
        c = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
        for i in range(CHATS):
            start = time.perf_counter()
            c.chat.completions.create(model=persona, max_tokens=8, temperature=0, messages=[
                {"role": "user", "content": f"Say something about the number {i}."}])
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def hostile_rows(config: Config, cast: Cast) -> list[Row]:
    from hyperlex.serve.http import Server
    from hyperlex.serve.limits import Limits

    service, engine, what = _service(config, cast)
    persona = service.speakers[0]
    try:
        with Server(service, port=0, log=False, limits=Limits(header_s=120)) as server:
            reused = _models_ms(server.url, reuse=True)
            fresh = _models_ms(server.url, reuse=False)
            _chat_latencies(server.url, persona)  # warm-up
            idle = _chat_latencies(server.url, persona)
            threads_idle = threading.active_count()
            slow = [socket.create_connection(server.server_address) for _ in range(SLOW)]
            for conn in slow:
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            try:
                loaded = _chat_latencies(server.url, persona)
                threads_loaded = threading.active_count()
            finally:
                for conn in slow:
                    conn.close()
    finally:
        if hasattr(engine, "close"):
            engine.close()
    p95_idle, p95_loaded = _p95(idle), _p95(loaded)
    return [
        Row("H1", "agent serve: GET /v1/models on a keep-alive connection (vs a new one)",
            reused, fresh, unit="ms", alt_label="new connection", ratio=reused / fresh,
            target="<= new + 2 ms", met=reused <= fresh + 2,
            details={"calls": CALLS, "engine": what}),
        Row("H2", f"agent serve: chat p95 with {SLOW} slow connections open (vs idle)",
            p95_loaded, p95_idle, unit="s", alt_label="idle server",
            ratio=p95_loaded / p95_idle, target="<= 2x", met=p95_loaded <= 2 * p95_idle,
            details={"clients": CLIENTS, "chats_each": CHATS, "engine": what,
                     "threads_idle": threads_idle, "threads_with_slow": threads_loaded}),
    ]
