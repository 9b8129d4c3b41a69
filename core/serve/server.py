"""``agent serve``: the personas behind an OpenAI-compatible HTTP API.

:class:`PersonaService` answers requests without knowing about HTTP: each chat completion is
a controller turn (contract, scene, routing for ``auto``), or, in engine mode, the client's
messages sent as they are to the persona's adapter (what vLLM does; hyperlex's own
``--backend openai`` uses it). :class:`Server` is a threaded HTTP/1.1 server from the standard
library: one thread per connection, each blocking on its own generation, so concurrency is
the engine's (a pool of llama.cpp contexts, or the torch engine's lock, which serializes turns
and so never mixes adapters).

A conversation id (the ``X-Conversation-Id`` header, else the request's ``user`` field) keeps
a controller, and so the scene and the current persona, across requests; with a store the
conversation is saved as the session of that name and survives a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from hyperlex.agent.controller import Controller, TurnStream, fit_reply
from hyperlex.agent.conversations import Conversations
from hyperlex.agent.router import DEFAULT_ROUTER
from hyperlex.engines.base import Engine
from hyperlex.errors import ContextTooLong, HyperlexError, PersonaNotAvailable, UnknownPersona
from hyperlex.generation import Generation, GenerationParams
from hyperlex.serve.openai_api import (
    ApiError,
    ChatRequest,
    bad_request,
    chunk_body,
    completion_body,
    completion_id,
    model_body,
    model_not_found,
    parse_chat_request,
    usage_body,
)

if TYPE_CHECKING:
    from hyperlex.agent.store import Store
    from hyperlex.host import Host

AUTO = "auto"
CONVERSATION_HEADER = "X-Conversation-Id"
MODE_HEADER = "X-Hyperlex-Mode"  # "engine": the messages are the whole prompt
PERSONA_HEADER = "X-Hyperlex-Persona"
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class _Conversation:
    controller: Controller
    lock: threading.Lock = field(default_factory=threading.Lock)


class Reply:
    """A started answer: ``persona`` is known before the first piece; iterate for the text."""

    def __init__(self, persona: str, pieces: Iterator[str], generation: Generation,
                 extra: dict[str, Any], release: Any = None):
        self.persona = persona
        self.extra = extra
        self._pieces = pieces
        self.generation = generation
        self._release = release

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._pieces
        finally:
            self.close()

    def close(self) -> None:
        """Stop generating (a client that went away) and free the conversation."""
        self.generation.cancel()
        with contextlib.suppress(Exception):
            self._pieces.close()  # type: ignore[attr-defined]
        if self._release is not None:
            release, self._release = self._release, None
            release()

    @property
    def usage(self) -> dict[str, int]:
        return usage_body(self.generation.usage.prompt_tokens,
                          self.generation.usage.completion_tokens)

    @property
    def finish_reason(self) -> str:
        reason = self.generation.finish_reason
        return reason if reason in ("stop", "length") else "stop"


class PersonaService:
    """The models and the turns behind the API."""

    def __init__(self, host: Host, engine: Engine, *, router: str | None = DEFAULT_ROUTER,
                 store: Store | None = None, overrides: dict[str, Any] | None = None,
                 max_conversations: int = 1000):
        self.host = host
        self.engine = engine
        self.router = router
        self.store = store
        self.overrides = dict(overrides or {})
        self.max_conversations = max_conversations
        self.created = int(time.time())
        self.conversations: Conversations[_Conversation] = Conversations(
            lambda name: _Conversation(self._controller(name)), max_conversations)

    def warm_up(self) -> None:
        """Load the automatic router (its embedding model, the personas' prototypes) in the
        background now rather than in the first ``auto`` request."""
        def route_once() -> None:
            with contextlib.suppress(Exception):  # the first real request reports it
                self._controller(None).route("hello")

        threading.Thread(target=route_once, name="hyperlex-router-warm-up", daemon=True).start()

    @property
    def speakers(self) -> list[str]:
        return sorted(self.engine.personas)

    def models(self) -> list[dict[str, Any]]:
        length = self.engine.context_length
        models = [model_body(AUTO, self.created, "Routes each turn to the persona that fits "
                             "it and keeps the scene (send a conversation id to keep it "
                             "across requests)", length)]
        for name in self.speakers:
            persona = self.engine.personas[name]
            models.append(model_body(name, self.created, persona.description, length))
        return models

    def model(self, name: str) -> dict[str, Any]:
        for model in self.models():
            if model["id"] == name:
                return model
        raise model_not_found(name, [AUTO, *self.speakers])

    def start(self, request: ChatRequest, conversation: str | None = None,
              engine_mode: bool = False) -> Reply:
        """Begin answering ``request``; errors before the first token are :class:`ApiError`."""
        if request.model != AUTO:
            try:
                self.engine.persona(request.model)
            except PersonaNotAvailable as exc:
                error = model_not_found(request.model, [AUTO, *self.speakers])
                if not isinstance(exc, UnknownPersona):  # installed, but it could not load
                    error.message = f"{exc}; {error.message}"
                raise error from None
        if engine_mode:
            return self._start_engine(request)
        if conversation is None:
            controller = self._controller(None)
            return self._start_turn(controller, request, None)
        entry = self._conversation(conversation)
        entry.lock.acquire()
        try:
            return self._start_turn(entry.controller, request, entry.lock.release,
                                    conversation)
        except BaseException:
            entry.lock.release()
            raise

    def _start_engine(self, request: ChatRequest) -> Reply:
        if request.model == AUTO:
            raise bad_request(f"{MODE_HEADER}: engine needs a persona as the model, not "
                              "'auto'", "model")
        if request.mood is not None:
            raise bad_request(f"{MODE_HEADER}: engine applies one adapter; 'mood' needs the "
                              "agent mode", "mood")
        # like vLLM: the request's settings over plain defaults, not the persona's contract
        params = GenerationParams().updated(request.options, "request")
        generation = self._engine_call(lambda: self.engine.stream(
            request.messages, request.model, fit_reply(self.engine, request.messages, params),
            request.stop, response_format=request.response_format))
        return Reply(request.model, iter(generation), generation, {"persona": request.model})

    def _start_turn(self, controller: Controller, request: ChatRequest, release: Any,
                    conversation: str | None = None) -> Reply:
        controller.history = list(request.history)  # the client's history is the truth
        turn: TurnStream = self._engine_call(lambda: controller.send(
            request.message, persona=request.model, mood=request.mood, options=request.options,
            stop=request.stop, instructions=request.instructions,
            response_format=request.response_format))
        decision = controller.last_decision
        extra = {"persona": turn.turn.persona, "conversation": conversation,
                 "route": {"source": decision.source, "reason": decision.reason}
                 if decision else None}
        return Reply(turn.turn.persona, iter(turn), turn.generation, extra, release)

    def _engine_call(self, call: Any) -> Any:
        try:
            return call()
        except ContextTooLong as exc:
            raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None
        except HyperlexError as exc:
            raise bad_request(str(exc)) from None

    def _controller(self, session: str | None) -> Controller:
        store = self.store if session is not None else None
        return Controller(self.host, self.engine, overrides=self.overrides,
                          router=self.router, store=store, session=session)

    def _conversation(self, name: str) -> _Conversation:
        return self.conversations.get(name)


def conversation_name(header: str | None, user: str | None) -> str | None:
    """The conversation a request belongs to: the header, used as the session name (so it
    must be a valid one), else the ``user`` field, used as it is when it is a valid session
    name and as ``user-<hash>`` when it is not (an e-mail address, say)."""
    from hyperlex.agent.store import check_name

    if header:
        try:
            return check_name(header)
        except HyperlexError:
            raise bad_request(f"conversation id {header!r}: use 1-64 letters, digits, '-', "
                              "'_' or '.'", CONVERSATION_HEADER) from None
    if not user:
        return None
    try:
        return check_name(user)
    except HyperlexError:
        return "user-" + hashlib.sha256(user.encode()).hexdigest()[:16]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the listen backlog: the default 5 resets a burst of clients

    def __init__(self, service: PersonaService, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, log: bool = True):
        self.service = service
        self.api_key = api_key or None
        self.log = log
        super().__init__((host, port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that drops its connection is normal; anything else is printed."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> Server:
        threading.Thread(target=self.serve_forever, name="hyperlex-serve", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self) -> None:  # noqa: N802 - the http.server convention
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._post)

    def do_PUT(self) -> None:  # noqa: N802
        self._handle(self._not_allowed)

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT  # noqa: N815

    def _not_allowed(self, path: str) -> None:
        raise ApiError(405, f"{self.command} is not allowed; hyperlex serves GET /v1/models "
                       "and POST /v1/chat/completions", code="method_not_allowed")

    def _handle(self, action: Any) -> None:
        self._body_read = False
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path != "/health":
                self._authorize()
            action(path)
        except ApiError as exc:
            self._discard_body()
            self._json(exc.status, exc.body())
        except _ClientGone:
            self.close_connection = True
        except Exception as exc:  # a bug, not the client's fault: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            with contextlib.suppress(Exception):
                self._json(500, ApiError(500, f"internal error: {type(exc).__name__}: "
                                         f"{exc}").body())

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            what = "a wrong API key" if given else "no API key"
            raise ApiError(401, f"the request has {what}; send 'Authorization: Bearer KEY' "
                           "with the key the server was started with", code="invalid_api_key")

    def _get(self, path: str) -> None:
        service = self.server.service
        if path == "/health":
            self._json(200, {"status": "ok", "models": len(service.speakers) + 1})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": service.models()})
        elif path.startswith("/v1/models/"):
            self._json(200, service.model(path.removeprefix("/v1/models/")))
        else:
            self._not_found(path)

    def _post(self, path: str) -> None:
        if path != "/v1/chat/completions":
            self._not_found(path)
        request = parse_chat_request(self._read_json())
        conversation = conversation_name(self.headers.get(CONVERSATION_HEADER), request.user)
        mode = (self.headers.get(MODE_HEADER) or "agent").lower()
        if mode not in ("agent", "engine"):
            raise bad_request(f"{MODE_HEADER} must be 'agent' or 'engine', got {mode!r}",
                              MODE_HEADER)
        reply = self.server.service.start(request, conversation, engine_mode=mode == "engine")
        try:
            if request.stream:
                self._stream(request, reply)
            else:
                self._complete(reply)
        finally:
            reply.close()

    def _complete(self, reply: Reply) -> None:
        try:
            text = "".join(reply).strip()
        except HyperlexError as exc:
            raise bad_request(str(exc)) from None
        self._json(200, completion_body(completion_id(), reply.persona, text,
                                        reply.finish_reason, reply.usage, reply.extra),
                   {PERSONA_HEADER: reply.persona})

    def _stream(self, request: ChatRequest, reply: Reply) -> None:
        cid = completion_id()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header(PERSONA_HEADER, reply.persona)
        self.end_headers()
        self._event(chunk_body(cid, reply.persona, {"role": "assistant", "content": ""},
                               extra=reply.extra))
        started = False
        try:
            for piece in reply:
                if not started:  # the reply starts at its first visible character
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    self._event(chunk_body(cid, reply.persona, {"content": piece}))
        except _ClientGone:
            raise
        except Exception as exc:  # the headers are sent: report it inside the stream
            if not isinstance(exc, HyperlexError):
                traceback.print_exc(file=sys.stderr)
            self._event(ApiError(500, f"generation failed: {exc}").body())
            self._end_stream()
            return
        self._event(chunk_body(cid, reply.persona, {}, reply.finish_reason))
        if request.include_usage:
            self._event(chunk_body(cid, reply.persona, {}, usage=reply.usage))
        self._end_stream()

    def _event(self, data: Any) -> None:
        payload = f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
        self._chunk(payload)

    def _end_stream(self) -> None:
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, payload: bytes) -> None:
        try:
            self.wfile.write(f"{len(payload):X}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _ClientGone from exc

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411 if length is None else 400, "send the JSON body with a "
                           "Content-Length header")
        size = int(length)
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"the request body is {size} bytes; the limit is "
                           f"{MAX_BODY_BYTES}")
        raw = self.rfile.read(size)
        self._body_read = True
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from None

    def _discard_body(self) -> None:
        """Read an unread body so the connection can serve the client's next request."""
        if self._body_read or self.command != "POST":
            return
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= MAX_BODY_BYTES:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _not_found(self, path: str) -> None:
        raise ApiError(404, f"no route {self.command} {path}; hyperlex serves GET /v1/models "
                       "and POST /v1/chat/completions", code="not_found")

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _ClientGone from exc
