"""Where hyperlex keeps its data: converted base models, later sessions and caches."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "HYPERLEX_HOME"


def home() -> Path:
    """The user data dir; ``HYPERLEX_HOME`` overrides the platform default."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_path

    return user_data_path("hyperlex", appauthor=False)


def models_dir() -> Path:
    return home() / "models"


def gguf_dir() -> Path:
    """Converted GGUF files (LoRA adapters and bases for llama.cpp), keyed by content hash."""
    return home() / "gguf"
