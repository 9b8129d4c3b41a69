"""hyperlex: personas as LoRA adapters on one shared base model.

The front door: everything a program needs is importable from ``hyperlex`` itself::

    from hyperlex import Controller, Host, open_engine

    host = Host()                                   # plugins and their personas (no torch)
    engine = open_engine(host.personas.values())    # the base once, every adapter attached
    turn = Controller(host, engine, persona="philosopher").send("What is time?").complete()

The names are imported lazily, so ``import hyperlex`` (and ``agent --help``) never pays for
torch, transformers or peft.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hyperlex.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    # plugins and personas
    "Host": "hyperlex.host",
    "Persona": "hyperlex.persona.bundle",
    "Contract": "hyperlex.persona.bundle",
    "BundleError": "hyperlex.persona.bundle",
    "build_prompt": "hyperlex.persona.prompt",
    "system_message": "hyperlex.persona.prompt",
    # the scene
    "Scene": "hyperlex.scene.model",
    "Hyperlexeme": "hyperlex.scene.model",
    "Link": "hyperlex.scene.model",
    "SceneField": "hyperlex.scene.model",
    "Delta": "hyperlex.scene.model",
    "DefaultEncoder": "hyperlex.scene.encoders",
    # engines
    "open_engine": "hyperlex.engines.registry",
    "ENGINES": "hyperlex.engines.registry",
    "Engine": "hyperlex.engines.base",
    "TorchEngine": "hyperlex.engines.torch.engine",
    "LlamaCppEngine": "hyperlex.engines.llamacpp.engine",
    "OpenAIEngine": "hyperlex.engines.openai",
    "GenerationParams": "hyperlex.generation",
    "Generation": "hyperlex.generation",
    "Completion": "hyperlex.generation",
    "ResponseFormat": "hyperlex.structured",
    # the agent
    "Controller": "hyperlex.agent.controller",
    "Turn": "hyperlex.agent.controller",
    "RouteDecision": "hyperlex.agent.router",
    "AutoRoute": "hyperlex.agent.router",
    "Store": "hyperlex.agent.store",
    # LangChain
    "ChatPersona": "hyperlex.integrations.langchain",
    "HyperlexAgent": "hyperlex.integrations.langchain",
    # errors
    "HyperlexError": "hyperlex.errors",
    "UnknownPersona": "hyperlex.errors",
    "PersonaNotAvailable": "hyperlex.errors",
    "ContextTooLong": "hyperlex.errors",
    "ModelNotInstalled": "hyperlex.errors",
}

__all__ = ["__version__", "hookimpl", *_LAZY]

if TYPE_CHECKING:
    from hyperlex.agent.controller import Controller, Turn  # noqa: F401
    from hyperlex.agent.router import AutoRoute, RouteDecision  # noqa: F401
    from hyperlex.agent.store import Store  # noqa: F401
    from hyperlex.engines.base import Engine  # noqa: F401
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine  # noqa: F401
    from hyperlex.engines.openai import OpenAIEngine  # noqa: F401
    from hyperlex.engines.registry import ENGINES, open_engine  # noqa: F401
    from hyperlex.engines.torch.engine import TorchEngine  # noqa: F401
    from hyperlex.errors import (  # noqa: F401
        ContextTooLong,
        HyperlexError,
        ModelNotInstalled,
        PersonaNotAvailable,
        UnknownPersona,
    )
    from hyperlex.generation import Completion, Generation, GenerationParams  # noqa: F401
    from hyperlex.host import Host  # noqa: F401
    from hyperlex.integrations.langchain import ChatPersona, HyperlexAgent  # noqa: F401
    from hyperlex.persona.bundle import BundleError, Contract, Persona  # noqa: F401
    from hyperlex.persona.prompt import build_prompt, system_message  # noqa: F401
    from hyperlex.scene.encoders import DefaultEncoder  # noqa: F401
    from hyperlex.scene.model import Delta, Hyperlexeme, Link, Scene, SceneField  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hyperlex' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
