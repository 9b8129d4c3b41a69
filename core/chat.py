"""The ``agent chat`` conversation loop: streamed replies, slash commands, Ctrl-C handling."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable

import click

from hyperlex.controller import Controller
from hyperlex.errors import HyperlexError

HELP = """Commands:
  /persona NAME   pin NAME: it answers every turn (/persona auto unpins)
  @NAME message   hand the conversation to NAME (when no persona is pinned)
  /personas       list the personas
  /help           this help
  /exit           leave (Ctrl-D works too); Ctrl-C cancels the reply being written"""


class ChatLoop:
    def __init__(self, controller: Controller, as_json: bool = False):
        self.controller = controller
        self.as_json = as_json
        self._problems_shown = len(controller.host.failures)

    def interactive(self) -> None:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - gives input() line editing and history
        click.echo("Type /help for commands, /exit or Ctrl-D to leave.", err=True)
        while True:
            prompt = f"{self.controller.pinned or self.controller.current or 'you'}> "
            if not sys.stdout.isatty():  # keep stdout for replies only
                click.echo(prompt, err=True, nl=False)
                prompt = ""
            try:
                line = input(prompt)
            except EOFError:
                click.echo(err=True)
                return
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-D or /exit to leave)", err=True)
                continue
            if not self.handle(line, show_persona=True):
                return

    def piped(self, lines: Iterable[str]) -> None:
        for line in lines:
            if not self.handle(line.rstrip("\n")):
                return

    def handle(self, line: str, show_persona: bool = False) -> bool:
        """Process one input line; False means the user asked to leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.turn(text, show_persona)
        return True

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            click.echo(HELP, err=True)
        elif name == "/personas":
            for persona in self.controller.personas:
                active = self.controller.pinned or self.controller.current
                mark = "*" if persona == active else " "
                title = self.controller.engine.personas[persona].title
                click.echo(f"{mark} {persona}  {title}", err=True)
        elif name == "/persona":
            if not arg:
                pinned, current = self.controller.pinned, self.controller.current
                state = f"{pinned} (pinned)" if pinned else f"{current or 'none yet'} (routed)"
                click.echo(f"persona: {state}", err=True)
                return True
            try:
                self.controller.pin(None if arg == "auto" else arg)
            except HyperlexError as exc:
                click.secho(f"Error: {exc}", fg="red", err=True)
            else:
                click.echo(f"persona: {arg}", err=True)
        else:
            click.secho(f"unknown command {name}; /help lists the commands", fg="red", err=True)
        return True

    def turn(self, message: str, show_persona: bool = False) -> None:
        stream = self.controller.send(message)
        if show_persona:
            click.secho(f"[{stream.turn.persona}] ", fg="cyan", err=True, nl=False)
        pieces = iter(stream)
        try:
            for piece in pieces:
                if not self.as_json:
                    click.echo(piece, nl=False)
        except KeyboardInterrupt:
            pieces.close()
            click.echo(err=True)
            click.secho("(reply cancelled)", fg="yellow", err=True)
            return
        if self.as_json:
            click.echo(json.dumps(stream.turn.as_dict(), ensure_ascii=False))
        else:
            click.echo()
        self._show_new_problems()

    def _show_new_problems(self) -> None:
        """Report plugin failures from this turn's hooks (route_turn, on_turn) once each."""
        failures = self.controller.host.failures
        for line in failures[self._problems_shown:]:
            click.secho(f"Warning: {line}", fg="yellow", err=True)
        self._problems_shown = len(failures)
