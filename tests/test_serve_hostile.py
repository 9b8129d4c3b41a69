"""``agent serve`` under faults and hostile input (issue 19), on the tiny model over loopback:
timeouts, framing, malformed input, tenants, clients that leave, and a schema-based fuzz.

Where a test needs a turn to be *running* at a given moment, the engine is :class:`Gated`:
its replies wait at a gate the test opens, so what is asserted never depends on timing."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from hyperlex.agent.store import Store
from hyperlex.generation import Generation
from hyperlex.host import Host
from hyperlex.serve.http import Server
from hyperlex.serve.limits import Limits
from hyperlex.serve.server import PersonaService
from hyperlex.serve.tenants import Keyring, load_keys

WAIT_S = 30  # how long a test waits for something that must happen (never reached)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "store.db") as opened:
        yield opened


def serving(host: Host, engine: Any, store: Store | None = None, keys: Keyring | None = None,
            **limits: Any) -> Server:
    return Server(PersonaService(host, engine, store=store), port=0, log=False, keys=keys,
                  limits=Limits(**limits))


class _GatedGeneration(Generation):
    def __init__(self, gated: Gated, persona: str | None):
        super().__init__(persona)
        self.gated = gated

    def _pieces(self) -> Iterator[str]:
        self.gated.started.set()
        yield "Waiting"
        while not self.gated.gate.wait(0.01):
            if self.cancelled:
                self.gated.cancelled.set()
                return
        yield " done."
        self.finish_reason = "stop"


class Gated:
    """The tiny engine, whose replies say "Waiting", then wait until ``gate`` is set (or
    they are cancelled, which sets ``cancelled``) and end with " done."."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.gate = threading.Event()
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def stream(self, messages: Any, persona: str | None, *args: Any, **kwargs: Any
               ) -> Generation:
        return _GatedGeneration(self, persona)


def request_bytes(body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    payload = json.dumps(body).encode()
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: test",
             "Content-Type: application/json", f"Content-Length: {len(payload)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def exchange(server: Server, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    with socket.create_connection(server.server_address, timeout=WAIT_S) as conn:
        conn.sendall(data)
        return read_to_close(conn)


def read_to_close(conn: socket.socket) -> bytes:
    received = b""
    while chunk := conn.recv(65536):
        received += chunk
    return received


def post(server: Server, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(*server.server_address, timeout=WAIT_S)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", "/v1/chat/completions", body=raw,
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    if response.getheader("content-type", "").startswith("text/event-stream"):
        return response.status, data
    return response.status, json.loads(data) if data else None


HI = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


# timeouts and framing -----------------------------------------------------------------------


def test_idle_and_half_sent_requests_are_closed_after_the_header_timeout(host, engine) -> None:
    with serving(host, engine, header_s=0.3) as server:
        assert exchange(server, b"") == b""  # connected, sent nothing
        assert exchange(server, b"POST /v1/chat/comp") == b""  # an unfinished request line
        assert exchange(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n") == b""


def test_a_body_shorter_than_its_content_length_is_a_408(host, engine) -> None:
    with serving(host, engine, body_s=0.3) as server:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                b"\r\n{\"model\":")
        answer = exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"


def test_an_idle_keep_alive_connection_is_closed(host, engine) -> None:
    with serving(host, engine, keep_alive_s=1, header_s=60) as server, \
            socket.create_connection(server.server_address, timeout=WAIT_S) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_to_close(conn)  # the answer, then the close after 1 s idle
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_responses_on_a_keep_alive_connection_are_not_held_by_nagle(host, engine) -> None:
    """A response goes out as a head and a body; with Nagle's algorithm on, the body of every
    response after the first waits for the client's delayed ACK (~40 ms, the old server's
    44 ms per request on a reused connection). Every accepted connection has TCP_NODELAY
    (bench row H1 measures the latency)."""
    with serving(host, engine) as server:
        conn = http.client.HTTPConnection(*server.server_address, timeout=WAIT_S)
        for _ in range(2):
            conn.request("GET", "/health")
            assert conn.getresponse().read()
        nodelay = [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                   socket.TCP_NODELAY)
                   for c in server.server.server_state.connections]
        conn.close()
    assert nodelay and all(nodelay)


def test_slow_connections_do_not_hold_up_the_others(host, engine) -> None:
    with serving(host, engine, header_s=60) as server:
        slow = [socket.create_connection(server.server_address) for _ in range(100)]
        try:
            for conn in slow:
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            threads_before = threading.active_count()
            assert post(server, HI)[0] == 200
            # worker threads for the turn, not one per connection
            assert threading.active_count() < threads_before + 10
        finally:
            for conn in slow:
                conn.close()


def test_a_body_framed_two_ways_is_refused_and_the_rest_is_not_run(host, engine) -> None:
    smuggled = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    with serving(host, engine) as server:
        answer = exchange(server, smuggled)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1 ") == 1  # the smuggled GET got no answer
    assert b"connection: close" in answer.lower()


def test_protocol_errors_are_json_without_a_server_banner(host, engine) -> None:
    with serving(host, engine) as server:
        answer = exchange(server, b"NOT HTTP AT ALL\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"server:" not in head.lower()
    assert json.loads(body)["error"]["code"] == "invalid_http"


def test_an_http_1_0_client_gets_no_chunked_stream(host, engine) -> None:
    body = json.dumps({**HI, "stream": True}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with serving(host, engine) as server:
        answer = exchange(server, request)
    head, events = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert events.rstrip().endswith(b"data: [DONE]")


def test_an_oversized_body_is_a_413(host, engine) -> None:
    with serving(host, engine, max_body_bytes=2048) as server:
        status, body = post(server, {**HI, "user": "x" * 4000})
    assert status == 413 and body["error"]["code"] == "body_too_large"


# client input is a 4xx ----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "param"), [
    ({**HI, "seed": -1}, "seed"),
    ({**HI, "messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    (b"[" * 200_000, None),
    (b"\xff\xfe", None),
])
def test_bad_input_that_used_to_be_a_500_is_a_400(host, engine, raw: Any, param: str) -> None:
    if isinstance(raw, dict):
        raw = json.dumps(raw).encode()  # json.dumps writes a lone surrogate as "\ud800"
    with serving(host, engine) as server:
        status, body = post(server, raw)
    assert status == 400, body
    assert body["error"]["param"] == param


def test_a_rejected_request_leaves_no_session(host, engine, store: Store) -> None:
    too_long = {**HI, "messages": [{"role": "user", "content": "word " * 5000}]}
    with serving(host, engine, store=store) as server:
        status, body = post(server, too_long, {"X-Conversation-Id": "never"})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert store.sessions(all_tenants=True) == []


# clients that leave, limits on work ----------------------------------------------------------


def test_a_non_streamed_client_that_leaves_cancels_its_turn(host, engine, store) -> None:
    gated = Gated(engine)
    with serving(host, gated, store=store) as server:
        conn = socket.create_connection(server.server_address, timeout=WAIT_S)
        conn.sendall(request_bytes(HI, {"X-Conversation-Id": "left"}))
        assert gated.started.wait(WAIT_S)
        conn.close()
        assert gated.cancelled.wait(WAIT_S)  # the turn was cancelled, not finished
    assert store.sessions(all_tenants=True) == []  # and nothing of it was saved


def test_a_streaming_client_that_leaves_cancels_its_turn(host, engine, store) -> None:
    gated = Gated(engine)
    with serving(host, gated, store=store) as server:
        conn = socket.create_connection(server.server_address, timeout=WAIT_S)
        conn.sendall(request_bytes({**HI, "stream": True}, {"X-Conversation-Id": "left"}))
        assert b"Waiting" in conn.recv(65536) or gated.started.wait(WAIT_S)
        conn.close()
        assert gated.cancelled.wait(WAIT_S)
    assert store.sessions(all_tenants=True) == []


def test_twenty_clients_leaving_mid_request_leak_nothing(host, engine, store) -> None:
    gated = Gated(engine)
    with serving(host, gated, store=store, concurrency=1) as server:
        threads_before = threading.active_count()
        for i in range(20):
            gated.started.clear()
            gated.cancelled.clear()
            conn = socket.create_connection(server.server_address, timeout=WAIT_S)
            body = {**HI, "stream": i % 2 == 0}
            conn.sendall(request_bytes(body, {"X-Conversation-Id": f"gone-{i % 3}"}))
            assert gated.started.wait(WAIT_S)
            conn.close()
            assert gated.cancelled.wait(WAIT_S)
        gated.gate.set()
        for name in ("gone-0", "gone-1", "gone-2"):  # no conversation left locked, and no
            status, _ = post(server, HI, {"X-Conversation-Id": name})  # request left counted
            assert status == 200  # against the limit of one at a time
        assert threading.active_count() < threads_before + 10  # idle workers at most
    assert sorted((s.name, s.turns) for s in store.sessions()) == [
        ("gone-0", 1), ("gone-1", 1), ("gone-2", 1)]  # the 20 abandoned turns left nothing


KILLED_SERVER = """
import sys
from pathlib import Path
from hyperlex.agent.store import Store
from hyperlex.engines.torch.engine import TorchEngine
from hyperlex.host import Host
from hyperlex.persona.bundle import Persona
from hyperlex.plugins import builtin_encoders
from hyperlex.serve.http import Server
from hyperlex.serve.server import PersonaService

base, bundle, db = sys.argv[1:4]
engine = TorchEngine([Persona.from_dir(Path(bundle))], base=base, progress=False)
host = Host(extra_plugins={"encoders": builtin_encoders}, entry_points=False)
server = Server(PersonaService(host, engine, store=Store(db)), port=0, log=False)
print(server.url, flush=True)
server.serve_forever()
"""


def test_a_server_killed_mid_stream_leaves_the_store_intact(tiny_base, tiny_bundles,
                                                            tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    db = tmp_path / "store.db"

    def start() -> tuple[subprocess.Popen, openai.OpenAI]:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_SERVER, str(tiny_base),
                                 str(tiny_bundles["alpha"]), str(db)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        return proc, openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

    walk = {"X-Conversation-Id": "walk"}
    ask = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}],
           "extra_headers": walk, "temperature": 0}
    proc, client = start()
    try:
        client.chat.completions.create(max_tokens=4, **ask)
        stream = client.chat.completions.create(max_tokens=400, stream=True, **ask)
        next(iter(stream))  # the turn is running
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(WAIT_S)
    finally:
        proc.kill()
    with Store(db) as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert store.session("walk").info.turns == 1  # the killed turn is not there
    proc, client = start()
    try:  # and the conversation goes on after the restart
        client.chat.completions.create(max_tokens=4, **ask)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT_S)
    with Store(db) as store:
        assert store.session("walk").info.turns == 2


def test_a_reply_over_the_generation_limit_is_a_504_and_not_saved(host, engine, store) -> None:
    gated = Gated(engine)
    with serving(host, gated, store=store, generation_s=0.2) as server:
        status, body = post(server, HI, {"X-Conversation-Id": "slow"})
    assert status == 504 and body["error"]["code"] == "generation_timeout"
    assert gated.cancelled.is_set()
    assert store.sessions(all_tenants=True) == []


@pytest.mark.parametrize("stream", [False, True])
def test_requests_beyond_the_concurrency_limit_get_a_503(host, engine, stream: bool) -> None:
    gated = Gated(engine)
    with serving(host, gated, concurrency=1) as server:
        first = threading.Thread(target=post, args=(server, {**HI, "stream": stream}))
        first.start()
        assert gated.started.wait(WAIT_S)
        status, body = post(server, HI)
        gated.gate.set()
        first.join(WAIT_S)
    assert status == 503 and body["error"]["code"] == "server_busy"


def test_shutdown_cancels_a_running_turn(host, engine, store) -> None:
    gated = Gated(engine)
    outcome: list[Any] = []

    def ask() -> None:
        try:
            outcome.append(post(server, HI, {"X-Conversation-Id": "cut"}))
        except (OSError, http.client.HTTPException) as exc:  # no answer at all
            outcome.append((None, exc))

    with serving(host, gated, store=store, graceful_s=1) as server:
        client = threading.Thread(target=ask)
        client.start()
        assert gated.started.wait(WAIT_S)
    assert gated.cancelled.wait(WAIT_S)
    client.join(WAIT_S)
    status, body = outcome[0]
    assert status == 503 and body["error"]["code"] == "shutting_down"
    assert store.sessions(all_tenants=True) == []


# tenants ------------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> Keyring:
    path = tmp_path / "keys.txt"
    path.write_text("# key tenant\nsk-ada-0001 ada\nsk-bob-0002 bob\nsk-ada-0003 ada\n")
    return load_keys(path)


def test_a_tenant_never_reaches_another_tenants_conversation(host, engine, store, keys) -> None:
    with serving(host, engine, store=store, keys=keys) as server:
        ada = openai.OpenAI(base_url=server.url, api_key="sk-ada-0001", max_retries=0)
        ada2 = openai.OpenAI(base_url=server.url, api_key="sk-ada-0003", max_retries=0)
        bob = openai.OpenAI(base_url=server.url, api_key="sk-bob-0002", max_retries=0)
        same = {"X-Conversation-Id": "plans"}
        for client in (ada, ada2, bob):
            client.chat.completions.create(model="alpha", max_tokens=2, extra_headers=same,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert ada.get("/conversations/plans", cast_to=object)["turns"].__len__() == 2
        assert len(bob.get("/conversations/plans", cast_to=object)["turns"]) == 1
        bob.chat.completions.create(model="alpha", max_tokens=2, user="ada@example.com",
                                    messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(openai.NotFoundError):
            ada.get(f"/conversations/{_user_id('ada@example.com')}", cast_to=object)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="sk-nobody-9", max_retries=0
                          ).models.list()
    sessions = {(s.tenant, s.name): s.turns for s in store.sessions(all_tenants=True)}
    assert sessions[("ada", "plans")] == 2 and sessions[("bob", "plans")] == 1
    assert store.sessions() == []  # the default tenant (agent chat's) sees neither


def test_a_conversation_without_a_store_is_read_from_memory(host, engine) -> None:
    with serving(host, engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        client.chat.completions.create(model="alpha", max_tokens=2, messages=[
            {"role": "user", "content": "The old lighthouse."}],
            extra_headers={"X-Conversation-Id": "mem"})
        held = client.get("/conversations/mem", cast_to=object)
        assert [t["user"] for t in held["turns"]] == ["The old lighthouse."]
        assert any(h["label"] == "lighthouse" for h in held["scene"]["hyperlexemes"])
        with pytest.raises(openai.NotFoundError):
            client.get("/conversations/other", cast_to=object)
        with pytest.raises(openai.BadRequestError) as caught:
            client.get("/conversations/no%20spaces", cast_to=object)
        assert caught.value.body["param"] == "conversation"


def _user_id(user: str) -> str:
    from hyperlex.serve.server import conversation_name

    name = conversation_name(None, user)
    assert name is not None
    return name


@pytest.mark.parametrize(("text", "problem"), [
    ("sk-ada-0001\n", "expected 'KEY TENANT', got 1 fields"),
    ("sk-ada-0001 ada\nsk-ada-0001 bob\n", "already the key of tenant 'ada'"),
    ("short ada\n", "at least 8 characters"),
    ("sk-ada-0001 a/b\n", "tenant 'a/b'"),
    ("ada: [sk-ada-0001, 3]\n", "each key must be a string"),
])
def test_a_bad_keys_file_names_the_line(tmp_path: Path, text: str, problem: str) -> None:
    from hyperlex.errors import HyperlexError

    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(HyperlexError, match="keys") as caught:
        load_keys(path)
    assert problem in str(caught.value)


def test_a_yaml_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("ada: sk-ada-0001\nbob: [sk-bob-0002, sk-bob-0003]\n")
    keys = load_keys(path)
    assert keys.tenants == ["ada", "bob"]
    assert keys.tenant("sk-bob-0003") == "bob" and keys.tenant("sk-bob-0004") is None


# the whole API, fuzzed -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed_server(host, engine, tmp_path_factory) -> Iterator[Server]:
    with Store(tmp_path_factory.mktemp("fuzz") / "store.db") as store, \
            Server(PersonaService(host, engine, store=store), port=0, log=False,
                   limits=Limits(generation_s=60)) as server:
        yield server


# (operation, mode): a request breaking the schema needs an input to break
FUZZED = [("health", "positive"), ("listModels", "positive"), ("listModels", "negative"),
          ("pageInfo", "positive"), ("listSessions", "positive"),
          *((operation, mode) for operation in ("retrieveModel", "createChatCompletion",
                                                "retrieveConversation", "getSession",
                                                "listSceneVersions", "exportSession",
                                                "deleteSession", "createTurn")
            for mode in ("positive", "negative"))]


@pytest.mark.parametrize(("operation_id", "mode"), FUZZED)
def test_the_fuzzed_api_never_answers_5xx(fuzzed_server: Server, operation_id: str,
                                          mode: str) -> None:
    """Requests generated from /openapi.json (valid ones, and ones that break it) never get
    a 5xx or hang; derandomized, so every run sends the same requests."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    from hyperlex.serve.openapi import openapi_document

    schema = schemathesis.openapi.from_dict(openapi_document())
    operation = next(result.ok() for result in schema.get_all_operations()
                     if result.ok().definition.raw.get("operationId") == operation_id)
    base_url = fuzzed_server.url.removesuffix("/v1")

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=25, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: Any) -> None:
        if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = 2  # keep replies short: the fuzz is about the input
        case.call_and_validate(base_url=base_url, checks=[not_a_server_error],
                               timeout=WAIT_S)

    fuzz()
