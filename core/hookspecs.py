"""The plugin contract: register-style hooks; the host owns policy.

Plugins implement these with ``@hyperlex.hookimpl`` and are found through the
``hyperlex`` entry-point group. Every hook is described, with an example, in ``docs/hooks.md``.

An implementation may take any subset of a hook's parameters, by name. Each parameter name
means the same thing in every hook that has it:

- ``register``: the host's registration callback for what the hook is about (a persona, a
  scene encoder, a router); the host validates what it is given and resolves name clashes.
- ``message``: the user's message, as typed.
- ``scene``: the conversation's :class:`hyperlex.Scene`, or None where there is no conversation.
- ``personas``: the personas that can answer this turn, a read-only mapping of name to
  :class:`hyperlex.Persona` (moods left out); routers get the same personas the same way.
- ``current``: the name of the persona that answered the previous turn, or None.

This module is imported by ``import hyperlex``, so the types named in the annotations are
imported for type checkers only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Mapping
    from typing import TypeAlias

    import click

    from hyperlex.agent.controller import Turn
    from hyperlex.agent.router import AutoRoute
    from hyperlex.persona.bundle import Persona
    from hyperlex.scene.model import Delta, Scene

    #: A scene encoder: the text of one utterance -> what it adds to the scene. An encoder
    #: object may also have a ``warm_up()`` method.
    SceneEncoder: TypeAlias = Callable[[str], Delta]
    #: An automatic router, called as ``router(message, scene, personas, current)``.
    Router: TypeAlias = Callable[
        [str, Scene | None, Mapping[str, Persona], str | None], AutoRoute | None
    ]

PROJECT = "hyperlex"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_personas(register: Callable[[str | os.PathLike[str] | Persona], None]) -> None:
    """Register persona bundles (and moods).

    Called once per host, the first time the personas are needed. Built-in plugins are called
    first; a persona name that is already registered is reported and skipped.

    :param register: Call ``register(bundle)`` once per persona, with the bundle's directory
        (a ``str`` or ``os.PathLike``; a relative path is resolved against the current working
        directory) or a ready :class:`hyperlex.Persona`. A directory is loaded and validated
        with ``Persona.from_dir``; an invalid bundle is reported and skipped.
    :return: Nothing; the return value is ignored.
    """


@hookspec
def register_scene_encoders(register: Callable[[str, SceneEncoder], None]) -> None:
    """Register text-to-scene-delta encoders, which personas choose by name.

    Called once per host, the first time the encoders are read (``Host.scene_encoders``).

    :param register: Call ``register(name, encoder)`` once per encoder: ``encoder(text)``
        returns the :class:`hyperlex.Delta` one utterance adds to the scene. A name that is
        already registered is reported and skipped.
    :return: Nothing; the return value is ignored.
    """


@hookspec
def register_routers(register: Callable[[str, Router], None]) -> None:
    """Register automatic turn routers, which the user chooses by name (``--router NAME``).

    Called once per host, the first time the routers are read (``Host.routers``).

    :param register: Call ``register(name, router)`` once per router:
        ``router(message, scene, personas, current)``, with the parameters meaning what they
        mean in :func:`route_turn`, returns a :class:`hyperlex.AutoRoute` or None to abstain.
        A name that is already registered is reported and skipped.
    :return: Nothing; the return value is ignored.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``agent`` command line.

    Called when ``agent --help`` lists the commands, when ``agent NAME`` is not a built-in
    command, and by ``agent plugins``. A built-in command cannot be replaced.

    :param cli: The ``agent`` click group: add commands with ``@cli.command()`` or
        ``cli.add_command(...)``.
    :return: Nothing; the return value is ignored.
    """


@hookspec
def route_turn(
    message: str, scene: Scene | None, personas: Mapping[str, Persona], current: str | None
) -> str | None:
    """Choose the persona that answers ``message``, before the automatic router is asked.

    Called for each message that is not pinned to a persona, addressed with ``@NAME`` or a
    request in words. This is not a pluggy ``firstresult`` hook: the host asks the
    implementations itself, one at a time (built-in plugins first, then pluggy's order), and
    the first answer that names one of ``personas`` decides; later implementations are not
    called. An implementation that raises, or names a persona not in ``personas``, is reported
    and the next one is asked.

    :param message: The user's message, as typed.
    :param scene: The conversation's scene before this message is encoded into it, or None
        when there is no conversation (``agent route`` without ``--session``, ``agent eval
        routing``).
    :param personas: The personas that can answer (in a chat: those on the loaded base; moods
        left out), a read-only mapping of name to persona in name order.
    :param current: The name of the persona that answered the previous turn (or was last
        chosen with ``/persona``), or None.
    :return: The name of the persona that should answer (a key of ``personas``), or None to
        abstain and let the next plugin, then the automatic router, decide.
    """


@hookspec
def on_turn(turn: Turn, scene: Scene) -> None:
    """Observe a finished turn.

    Called once per finished turn in ``agent chat``, after the reply was encoded into the scene
    and before the turn is saved.

    :param turn: The finished turn; add what you observe to ``turn.annotations`` (prefix keys
        with your plugin's name), which is shown and stored with the turn.
    :param scene: The conversation's scene after the turn.
    :return: Nothing; the return value is ignored.
    """
