"""Registers the built-in scene encoders, like any other plugin would.

``default`` is :class:`hyperlex.scene.encoders.DefaultEncoder` (spaCy). Registering it is cheap:
its language pipeline is loaded on the first call, not here.
"""

from __future__ import annotations

from hyperlex import hookimpl
from hyperlex.scene.encoders import DefaultEncoder


@hookimpl
def register_scene_encoders(register):
    register("default", DefaultEncoder())
