"""Does a reply name only commands that exist?

The interface's contract says "never invent commands or options", and its replies name
commands in backticks (`` `agent chat -p philosopher` ``). A self-distillation round that
keeps such replies teaches whatever they name, so ``agent data faithful`` refuses a
candidate that names an ``agent`` command, subcommand, option or persona that does not
exist (measured on the interface's chat round: 42 of 65 records named one, most often
``agent chat -p`` with the statement's subject as the persona); and ``agent chat``,
``agent serve`` and ``agent eval negation`` rank such a best-of sample below the others
(:mod:`hyperlex.agent.verify`).

The check parses each backticked span that starts with ``agent`` with the CLI itself (click's
own option parser: unknown commands and options fail, while a command or option named
without its arguments is fine, as "run `agent train`" and "add `--json`" are), so it knows
every built-in and plugin command without a list to keep.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from typing import Any

import click

_SPAN = re.compile(r"`([^`\n]+)`")
PROGRAM = "agent"


class CommandReferences:
    """Checks the command lines a text names against ``root`` (the ``agent`` group) and the
    installed ``personas``."""

    def __init__(self, root: click.Group, personas: Iterable[str]):
        self.root = root
        self.personas = frozenset(personas)

    @classmethod
    def of_this_cli(cls, personas: Iterable[str]) -> CommandReferences:
        """The check for the running ``agent`` command (its root group, plugin commands
        included)."""
        return cls(click.get_current_context().find_root().command, personas)

    def problem(self, text: str) -> str | None:
        """What is wrong with the first command line ``text`` names in backticks (None:
        every one exists)."""
        for span in _SPAN.findall(text):
            why = self.check(span)
            if why is not None:
                return f"`{span}`: {why}"
        return None

    def check(self, line: str) -> str | None:
        """What is wrong with one command line (None: it exists, or is not an ``agent``
        command line at all)."""
        try:
            words = shlex.split(line)
        except ValueError:
            return None
        if not words or words[0] != PROGRAM:
            return None
        command: click.Command = self.root
        context = click.Context(command, info_name=PROGRAM)
        args = words[1:]
        while isinstance(command, click.Group) and args and not args[0].startswith("-"):
            sub = command.get_command(context, args[0])
            if sub is None:
                return f"no command {context.command_path + ' ' + args[0]!r}"
            command, context, args = sub, click.Context(sub, info_name=args[0],
                                                        parent=context), args[1:]
        try:
            values, _, _ = command.make_parser(context).parse_args(list(args))
        except click.NoSuchOption as error:
            return error.format_message()
        except click.BadOptionUsage:  # an option named without its value: it exists
            return None
        return self._unknown_persona(command, values)

    def _unknown_persona(self, command: click.Command, values: dict[str, Any]) -> str | None:
        for param in command.params:
            if "--persona" not in getattr(param, "opts", ()):
                continue
            value = values.get(param.name)
            for given in [value] if isinstance(value, str) else list(value or ()):
                if given not in self.personas:
                    return f"no persona {given!r}"
        return None
