"""Registers the built-in scene encoders, like any other plugin would.

``default`` is :class:`hyperlex.scene.encoders.DefaultEncoder` (spaCy). ``reader`` is the
scene-reader (:class:`hyperlex.agent.reader.ReaderEncoder`), a LoRA adapter on the base model
shipped in this package's ``reader/`` bundle. Registering them is cheap: a language pipeline
or model is loaded on an encoder's first call, not here.
"""

from __future__ import annotations

from pathlib import Path

from hyperlex import hookimpl
from hyperlex.agent.reader import ReaderEncoder
from hyperlex.scene.encoders import DefaultEncoder

READER_BUNDLE = Path(__file__).parent / "reader"


@hookimpl
def register_scene_encoders(register):
    register("default", DefaultEncoder())
    register("reader", ReaderEncoder(READER_BUNDLE))
