"""hyperlex: personas as LoRA adapters on one shared base model.

The public names are imported lazily so that ``import hyperlex`` (and ``agent --help``)
never pays for torch, transformers or peft.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hyperlex.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "Persona": "hyperlex.persona.bundle",
    "Contract": "hyperlex.persona.bundle",
    "BundleError": "hyperlex.persona.bundle",
    "Scene": "hyperlex.scene.model",
    "Hyperlexeme": "hyperlex.scene.model",
    "Link": "hyperlex.scene.model",
    "Field": "hyperlex.scene.model",
    "Delta": "hyperlex.scene.model",
    "RouteDecision": "hyperlex.agent.router",
    "AutoRoute": "hyperlex.agent.router",
    "Turn": "hyperlex.agent.controller",
    "GenerationParams": "hyperlex.generation",
    "HyperlexError": "hyperlex.errors",
}

__all__ = ["__version__", "hookimpl", *_LAZY]

if TYPE_CHECKING:
    from hyperlex.agent.controller import Turn  # noqa: F401
    from hyperlex.agent.router import AutoRoute, RouteDecision  # noqa: F401
    from hyperlex.errors import HyperlexError  # noqa: F401
    from hyperlex.generation import GenerationParams  # noqa: F401
    from hyperlex.persona.bundle import BundleError, Contract, Persona  # noqa: F401
    from hyperlex.scene.model import Delta, Field, Hyperlexeme, Link, Scene  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hyperlex' has no attribute {name!r}")
