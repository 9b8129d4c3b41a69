"""The HTTP routes of ``agent serve``: a Starlette app over :class:`PersonaService`.

OpenAI's URLs, bodies and error shapes (``{"error": {message, type, param, code}}`` for every
error, the router's 404 and 405 included). The service blocks (a turn runs on the engine), so
every call into it runs in a worker thread; while it runs, a watcher waits for the client to
disconnect or the generation time limit to pass, and either cancels the turn, which then is
not saved. Streaming is Server-Sent Events, one ``chat.completion.chunk`` per piece.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from hyperlex.agent.store import DEFAULT_TENANT, check_name
from hyperlex.errors import HyperlexError
from hyperlex.serve.events import EventStream
from hyperlex.serve.limits import Limits
from hyperlex.serve.openai_api import (
    ApiError,
    ChatRequest,
    bad_request,
    chunk_body,
    completion_body,
    completion_id,
    parse_chat_request,
    parse_json_body,
)
from hyperlex.serve.openapi import openapi_document
from hyperlex.serve.page import page_routes
from hyperlex.serve.server import (
    CONVERSATION_HEADER,
    MODE_HEADER,
    PERSONA_HEADER,
    PersonaService,
    Reply,
    conversation_name,
)
from hyperlex.serve.tenants import Keyring

log = logging.getLogger("hyperlex.serve")
T = TypeVar("T")
SERVED = "hyperlex serves GET /v1/models and POST /v1/chat/completions"


def create_app(service: PersonaService, keys: Keyring | None = None,
               limits: Limits | None = None, ui: bool = True) -> Any:
    """The ASGI app: the routes (the page's JSON API, and with ``ui`` the page at ``/``),
    their error handlers, and the answer on shutdown."""
    api = Api(service, keys or Keyring(), limits or Limits())
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/conversations/{name}", api.conversation, methods=["GET"]),
        *page_routes(api, ui),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # every request in progress may hold a worker thread: its turn runs there
        anyio.to_thread.current_default_thread_limiter().total_tokens = max(
            40, api.limits.concurrency + 8)
        yield

    app = Starlette(routes=routes, exception_handlers=handlers,  # type: ignore[arg-type]
                    lifespan=lifespan)
    return _AnswerWhenCancelled(app)  # type: ignore[return-value]


class _AnswerWhenCancelled:
    """A request cancelled before its answer started (the server shutting down past
    ``--timeout-graceful``) gets OpenAI's JSON 503 rather than uvicorn's plain-text 500."""

    def __init__(self, app: Starlette):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except anyio.get_cancelled_exc_class():
            if not started and scope["type"] == "http":
                with anyio.CancelScope(shield=True):
                    error = ApiError(503, "the server is shutting down; the turn was "
                                     "cancelled and not saved", code="shutting_down")
                    await _error_response(error)(scope, receive, send)
            raise


class Api:
    def __init__(self, service: PersonaService, keys: Keyring, limits: Limits):
        self.service = service
        self.keys = keys
        self.limits = limits
        self.in_progress = 0

    # -- routes -----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": len(self.service.speakers) + 1})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def models(self, request: Request) -> Response:
        self.tenant(request)
        return JSONResponse({"object": "list", "data": self.service.models()})

    async def model(self, request: Request) -> Response:
        self.tenant(request)
        return JSONResponse(self.service.model(request.path_params["name"]))

    async def conversation(self, request: Request) -> Response:
        tenant = self.tenant(request)
        name = request.path_params["name"]
        try:
            check_name(name)
        except HyperlexError:
            raise bad_request(f"conversation id {name!r}: use 1-64 letters, digits, '-', '_' "
                              "or '.'", "conversation") from None
        document = await anyio.to_thread.run_sync(self.service.conversation, tenant, name)
        return JSONResponse(document)

    async def chat(self, request: Request) -> Response:
        """A chat completion; it counts against ``--limit-concurrency`` until its answer has
        been sent (for a stream: until the stream ends)."""
        tenant = self.tenant(request)
        return await self.admitted(partial(self._chat, request, tenant))

    async def admitted(self, answer: Callable[[], Awaitable[Response]]) -> Response:
        """``answer()`` within ``--limit-concurrency``: its slot is held until the answer
        has been sent (for a stream: until the stream ends)."""
        if self.in_progress >= self.limits.concurrency:
            raise ApiError(503, f"the server is answering {self.in_progress} requests, its "
                           "limit (--limit-concurrency); retry shortly", code="server_busy")
        self.in_progress += 1
        response: Response | None = None
        try:
            response = await answer()
            return response
        finally:
            if not isinstance(response, EventStream):  # a stream releases when it ends
                self.release()

    def release(self) -> None:
        self.in_progress -= 1

    async def _chat(self, request: Request, tenant: str) -> Response:
        chat = parse_chat_request(parse_json_body(await self.body(request)))
        conversation = conversation_name(request.headers.get(CONVERSATION_HEADER), chat.user)
        mode = (request.headers.get(MODE_HEADER) or "agent").lower()
        if mode not in ("agent", "engine"):
            raise bad_request(f"{MODE_HEADER} must be 'agent' or 'engine', got {mode!r}",
                              MODE_HEADER)
        start = partial(self.service.start, chat, conversation, engine_mode=mode == "engine",
                        tenant=tenant)
        reply = await anyio.to_thread.run_sync(start)
        if chat.stream:
            return _chunk_stream(self, chat, reply)
        try:
            text, outcome = await self.watched(request.receive, reply,
                                               partial(anyio.to_thread.run_sync,
                                                       partial(_join, reply)))
        finally:
            reply.close()
        if outcome == "gone":
            return Response(status_code=499)  # nobody reads it: the client has left
        if outcome == "timeout":
            raise self.timeout_error()
        return JSONResponse(completion_body(completion_id(), reply.persona, text,
                                            reply.finish_reason, reply.usage, reply.extra),
                            headers={PERSONA_HEADER: reply.persona})

    # -- helpers ----------------------------------------------------------------------------

    def tenant(self, request: Request) -> str:
        if not self.keys.required:
            return DEFAULT_TENANT
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        tenant = self.keys.tenant(token.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            what = "a wrong API key" if given else "no API key"
            raise ApiError(401, f"the request has {what}; send 'Authorization: Bearer KEY' "
                           "with a key the server was started with", code="invalid_api_key")
        return tenant

    async def body(self, request: Request) -> bytes:
        """The body, within the size and time limits; a body framed two ways (the shape of
        request smuggling) is refused and the connection closed."""
        headers = request.headers
        limit = self.limits.max_body_bytes
        if "transfer-encoding" in headers and "content-length" in headers:
            raise ApiError(400, "the request has both Content-Length and Transfer-Encoding; "
                           "send one", close=True)
        length = headers.get("content-length")
        if length is None and "transfer-encoding" not in headers:
            raise ApiError(411, "send the JSON body with a Content-Length header",
                           code="length_required")
        if length is not None and int(length) > limit:  # h11 has checked it is digits
            raise ApiError(413, f"the request body is {length} bytes; the limit is {limit} "
                           "(--max-body-bytes)", code="body_too_large", close=True)
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(self.limits.body_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"the request body is over the limit of {limit} "
                                       "bytes (--max-body-bytes)", code="body_too_large",
                                       close=True)
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within "
                           f"{self.limits.body_s:g} s", code="body_timeout", close=True) from None
        return b"".join(chunks)

    async def watched(self, receive: Receive, reply: Reply,
                      work: Callable[[], Awaitable[T]]) -> tuple[T, str | None]:
        """Run ``work`` while watching for the client to leave ("gone") or the generation
        time limit to pass ("timeout"): either cancels the turn. The outcome is None when
        the turn ended on its own."""
        outcomes: list[str] = []
        done = False

        async def watch() -> None:
            try:
                with anyio.move_on_after(self.limits.generation_s):
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    outcomes.append("gone")
                    return
                outcomes.append("timeout")
            finally:  # also when the server shuts down and cancels the request
                if not done:
                    reply.cancel()

        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            try:
                result = await work()
            except Exception as exc:  # raised inside the group, it would come out as a group
                failure = exc
            done = True
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure
        cancelled = reply.generation.finish_reason not in ("stop", "length")
        return result, outcomes[0] if outcomes and cancelled else None

    def timeout_error(self) -> ApiError:
        return ApiError(504, f"the reply took longer than {self.limits.generation_s:g} s "
                        "(--timeout-generation); it was stopped and not saved",
                        code="generation_timeout")


def _chunk_stream(api: Api, chat: ChatRequest, reply: Reply) -> EventStream:
    """A streamed completion: the role chunk, one chunk per piece, the finish chunk (and the
    usage chunk when asked for), then ``[DONE]``."""
    cid = completion_id()

    def closing() -> list[Any]:
        events = [chunk_body(cid, reply.persona, {}, reply.finish_reason)]
        if chat.include_usage:
            events.append(chunk_body(cid, reply.persona, {}, usage=reply.usage))
        return events

    return EventStream(api, reply,
                       [chunk_body(cid, reply.persona, {"role": "assistant", "content": ""},
                                   extra=reply.extra)],
                       lambda piece: chunk_body(cid, reply.persona, {"content": piece}),
                       closing)


def _join(reply: Reply) -> str:
    try:
        return "".join(reply).strip()
    except HyperlexError as exc:
        raise bad_request(str(exc)) from None


def _error_response(error: ApiError) -> Response:
    headers = {"connection": "close"} if error.close else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        error = ApiError(405, f"{request.method} is not allowed on {request.url.path}; {SERVED}",
                         code="method_not_allowed")
    elif exc.status_code == 404:
        error = ApiError(404, f"no route {request.method} {request.url.path}; {SERVED}",
                         code="not_found")
    else:
        error = ApiError(exc.status_code, str(exc.detail))
    return _error_response(error)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug, not the client's fault: logged with its traceback, answered as a 500."""
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))
