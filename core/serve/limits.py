"""What one client may hold on ``agent serve``: each limit is a command-line option
(docs/serving.md, "Limits and timeouts"). Kept apart from the app so ``agent --help`` does
not import the HTTP stack."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    header_s: float = 10.0  # a request's line and headers must arrive within this
    body_s: float = 30.0  # and its body within this (else 408)
    max_body_bytes: int = 4 * 1024 * 1024  # else 413
    concurrency: int = 256  # chat requests in progress at once; beyond: 503
    generation_s: float = 600.0  # one reply's generation; beyond: cancelled, 504
    graceful_s: float = 30.0  # on SIGINT/SIGTERM, running turns get this long to finish
