"""The plugin contract: register-style hooks; the host owns policy.

Plugins implement these with ``@hyperlex.hookimpl`` and are found through the
``hyperlex`` entry-point group. Every hook is described, with an example, in ``docs/hooks.md``.
"""

from __future__ import annotations

import pluggy

PROJECT = "hyperlex"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_personas(register):
    """Register persona bundles: call ``register(bundle_dir_or_Persona)`` once per persona."""


@hookspec
def register_scene_encoders(register):
    """Register text-to-scene-delta encoders: call ``register(name, encoder)``."""


@hookspec
def register_routers(register):
    """Register turn routers the meta-controller can consult: call ``register(name, router)``."""


@hookspec
def register_commands(cli):
    """Add click commands to the ``agent`` command group ``cli``."""


@hookspec(firstresult=True)
def route_turn(message, scene, personas, current):
    """Return the name of the persona that should answer ``message``, or None to abstain."""


@hookspec
def on_turn(turn, scene):
    """Observe a finished turn; may add entries to ``turn.annotations``."""
