"""Engines by name: ``torch``, ``llamacpp`` and ``openai``, opened the same way.

Each entry names the module that implements it, imported only when that engine is opened,
so choosing an engine (or listing them) never imports torch or llama.cpp.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hyperlex.errors import HyperlexError

if TYPE_CHECKING:
    from hyperlex.engines.base import Engine
    from hyperlex.persona.bundle import Persona


@dataclass(frozen=True)
class EngineEntry:
    name: str
    module: str  # defines ``create_engine(personas, base, **options) -> Engine``
    needs: str | None  # the import package it runs on, when that is optional
    summary: str

    def available(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None


ENGINES: dict[str, EngineEntry] = {
    entry.name: entry
    for entry in (
        EngineEntry("torch", "hyperlex.engines.torch.engine", None,
                    "transformers + PEFT: the reference; training, evaluation, inspection"),
        EngineEntry("llamacpp", "hyperlex.engines.llamacpp.engine", "llama_cpp",
                    "llama.cpp with GGUF LoRA adapters: several times faster on a CPU"),
        EngineEntry("openai", "hyperlex.engines.openai", "openai",
                    "an OpenAI-compatible server (vLLM, agent serve) that holds the adapters"),
    )
}


def engine_entry(name: str) -> EngineEntry:
    try:
        return ENGINES[name]
    except KeyError:
        raise HyperlexError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}") from None


def open_engine(personas: Iterable[Persona], engine: str = "torch", base: str | None = None,
                **options: Any) -> Engine:
    """Load ``base`` (default: the embedded model) once on ``engine`` and attach every
    persona's adapter. ``options`` are the engine's own: ``dtype``, ``quantize``, ``merge``
    and ``max_batch`` (torch), ``contexts`` and ``sequences`` (llamacpp), ``base_url`` and
    ``api_key`` (openai). A persona that cannot be attached is left out, with the reason in
    ``skipped``."""
    entry = engine_entry(engine)
    if not entry.available():
        raise HyperlexError(f"the {engine} engine needs the {entry.needs} package: pip install "
                            f"'hyperlex[{engine}]'")
    module = importlib.import_module(entry.module)
    return module.create_engine(list(personas), base, **options)
