"""Registers the automatic router (sentence-embedding scores with hysteresis)."""

from __future__ import annotations

from hyperlex import hookimpl
from hyperlex.agent.router import EmbeddingRouter


@hookimpl
def register_routers(register):
    register("embedding", EmbeddingRouter())
