"""The stoic persona as a hyperlex plugin: its bundle and its scene encoder."""

from pathlib import Path

from hyperlex import hookimpl

from hyperlex_persona_stoic.encoder import SceneEncoder

BUNDLE = Path(__file__).parent / "bundle"


@hookimpl
def register_personas(register):
    register(BUNDLE)


@hookimpl
def register_scene_encoders(register):
    register("stoic-scene", SceneEncoder())
