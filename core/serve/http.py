"""The HTTP server under ``agent serve``: uvicorn (h11) running :mod:`hyperlex.serve.app`.

uvicorn parses HTTP/1.0 and 1.1, keeps connections alive (closing idle ones after
``Limits.keep_alive_s``) and shuts down gracefully on SIGINT/SIGTERM. Two things it does not
do are added by :class:`_Protocol`: a deadline for a request's line and headers (a client that
sends a byte every few seconds is closed after ``Limits.header_s``), and OpenAI's JSON error
shape for the malformed requests it answers before the app sees them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from hyperlex.serve.app import create_app
from hyperlex.serve.limits import Limits
from hyperlex.serve.openai_api import ApiError
from hyperlex.serve.server import PersonaService
from hyperlex.serve.tenants import Keyring

START_TIMEOUT_S = 30.0


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head."""

    head_timeout_s = Limits.header_s
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's head arrived
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._waiting_for_head():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return not self.transport.is_closing() and (
            self.cycle is None or self.cycle.response_complete)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._waiting_for_head():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(ApiError(400, f"the request is not valid HTTP/1.1: {msg}",
                                   code="invalid_http").body()).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def _logging(log: bool) -> dict[str, Any]:
    """Request lines to stderr (when ``log``), uvicorn's own warnings and errors always."""
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
               "formatter": "plain"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(message)s"}},
        "handlers": {"stderr": handler},
        "loggers": {
            "uvicorn.error": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
            "uvicorn.access": {"handlers": ["stderr"] if log else [],
                               "level": "INFO" if log else "CRITICAL", "propagate": False},
            "hyperlex.serve": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        },
    }


class Server:
    """``agent serve``'s server: bound at construction (so a busy port fails here, and port 0
    has its number), then run in this thread (:meth:`serve_forever`) or, as a context
    manager, in a background thread (tests, benches)."""

    def __init__(self, service: PersonaService, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, log: bool = True, keys: Keyring | None = None,
                 limits: Limits | None = None, ui: bool = True):
        self.service = service
        self.limits = limits or Limits()
        self.keys = keys if keys is not None else Keyring.single(api_key)
        self.app = create_app(service, self.keys, self.limits, ui)
        protocol = type("Protocol", (_Protocol,), {"head_timeout_s": self.limits.header_s})
        self.config = uvicorn.Config(
            self.app, http=protocol, lifespan="on", log_config=_logging(log),
            access_log=log, server_header=False, date_header=True,
            timeout_keep_alive=max(1, round(self.limits.keep_alive_s)),
            timeout_graceful_shutdown=max(1, round(self.limits.graceful_s)), backlog=2048)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it a response written as head then body waits ~40 ms for the client's
        # delayed ACK on a reused keep-alive connection (Nagle)
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(self.config.backlog)  # clients queue until uvicorn accepts
        except OSError:
            self.socket.close()
            raise
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (then finish or cancel running turns) or :meth:`stop`."""
        self.server.run(sockets=[self.socket])

    def stop(self) -> None:
        self.server.should_exit = True

    def server_close(self) -> None:
        self.socket.close()

    def __enter__(self) -> Server:
        thread = self._thread = threading.Thread(target=self.serve_forever,
                                                 name="hyperlex-serve", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise RuntimeError("the server did not start (its log is above)")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(self.limits.graceful_s + 5)
        self.server_close()

