"""A reply streamed as Server-Sent Events, for both streams ``agent serve`` sends: OpenAI's
``chat.completion.chunk`` events and the page's turn events (:mod:`hyperlex.serve.page`).

What the two share lives here: the opening events (sent before the first piece), one event per
piece of text (the reply starts at its first visible character), the closing events, errors
reported inside the stream once its headers are out (OpenAI's error body), and the watcher
that cancels the turn when the client leaves or the generation time limit passes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from hyperlex.errors import HyperlexError
from hyperlex.serve.openai_api import ApiError
from hyperlex.serve.server import PERSONA_HEADER, Reply

log = logging.getLogger("hyperlex.serve")
T = TypeVar("T")


class Gate(Protocol):
    """What a stream needs from the app: the watcher, the concurrency slot, the 504."""

    async def watched(self, receive: Receive, reply: Reply,
                      work: Callable[[], Awaitable[T]]) -> tuple[T, str | None]: ...

    def release(self) -> None: ...

    def timeout_error(self) -> ApiError: ...


def sse(data: Any) -> bytes:
    """One ``data:`` event (JSON, or a literal such as ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    """``opening`` events, ``piece(text)`` per piece, ``closing()`` events when the reply
    ended on its own, then ``[DONE]``. The request's concurrency slot is released when the
    stream ends."""

    def __init__(self, gate: Gate, reply: Reply, opening: list[Any],
                 piece: Callable[[str], Any], closing: Callable[[], list[Any]]):
        self.gate = gate
        self.reply = reply
        self.opening = opening
        self.piece = piece
        self.closing = closing
        self.status_code = 200
        self.background = None
        self.init_headers({"content-type": "text/event-stream; charset=utf-8",
                           "cache-control": "no-cache", PERSONA_HEADER: reply.persona})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reply = self.reply

        async def event(data: Any) -> None:
            await send({"type": "http.response.body", "body": sse(data), "more_body": True})

        async def pieces() -> Exception | None:
            pieces = iter(reply)
            started = False
            try:
                while True:
                    piece = await anyio.to_thread.run_sync(next, pieces, None)
                    if piece is None:
                        return None
                    if not started:  # the reply starts at its first visible character
                        piece = piece.lstrip()
                        started = bool(piece)
                    if piece:
                        await event(self.piece(piece))
            except OSError:  # the client has gone; the watcher cancels the turn
                return None
            except Exception as exc:  # the headers are sent: report it inside the stream
                return exc

        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            for opening in self.opening:
                await event(opening)
            failure, outcome = await self.gate.watched(receive, reply, pieces)
        finally:
            reply.close()
            self.gate.release()
        if outcome == "gone":
            return
        if outcome == "timeout":
            await event(self.gate.timeout_error().body())
        elif failure is not None:
            if not isinstance(failure, HyperlexError):
                log.error("generation failed", exc_info=failure)
            await event(ApiError(500, f"generation failed: {failure}").body())
        else:
            for closing in self.closing():
                await event(closing)
        await send({"type": "http.response.body", "body": sse("[DONE]"), "more_body": False})
