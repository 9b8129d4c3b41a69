"""The ``agent chat`` conversation loop: streamed replies, slash commands, Ctrl-C handling."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

import click

from hyperlex.agent.controller import Controller
from hyperlex.errors import HyperlexError

if TYPE_CHECKING:
    from hyperlex.structured import ResponseFormat

HELP = """Commands:
  /persona NAME   pin NAME: it answers every turn (/persona auto routes again)
  @NAME message   hand the conversation to NAME (when no persona is pinned)
                  ("let the poet answer: ...", "switch to the scientist" work too)
  /personas       list the personas
  /why            why the last turn went to its persona, with the router's scores
  /scene [tree|json]  the shared scene: hyperlexemes, links, field (default: a table)
  /mood NAME[:W]  compose a mood layer over every persona (/mood off removes it)
  /best-of N      sample N replies per turn, answer with the one that keeps your facts
  /session        the session this conversation is saved in
  /help           this help
  /exit           leave (Ctrl-D works too); Ctrl-C cancels the reply being written"""


class ChatLoop:
    def __init__(self, controller: Controller, as_json: bool = False,
                 response_format: ResponseFormat | None = None):
        """``response_format``: every reply is JSON matching it (``agent chat --schema``)."""
        self.controller = controller
        self.as_json = as_json
        self.response_format = response_format
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
        elif name == "/why":
            self.why()
        elif name == "/scene":
            self.show_scene(arg or "table")
        elif name == "/mood":
            self.mood(arg)
        elif name == "/best-of":
            self.best_of(arg)
        elif name == "/session":
            click.echo(f"session: {self.controller.session or 'not saved (--no-store)'}",
                       err=True)
        else:
            click.secho(f"unknown command {name}; /help lists the commands", fg="red", err=True)
        return True

    def why(self) -> None:
        decision = self.controller.last_decision
        if decision is None:
            click.echo("no turn yet", err=True)
            return
        click.echo(f"{decision.persona}: {decision.reason}", err=True)
        for persona, score in sorted(decision.scores.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {persona:<12} {score:.3f}", err=True)

    def show_scene(self, style: str) -> None:
        from hyperlex.scene.display import scene_table, scene_tree

        scene = self.controller.scene
        views = {"table": scene_table, "tree": scene_tree, "json": lambda s: s.to_json()}
        if style not in views:
            click.secho(f"/scene {style}: choose table, tree or json", fg="red", err=True)
            return
        click.echo(views[style](scene))

    def mood(self, arg: str) -> None:
        if not arg:
            moods = ", ".join(sorted(self.controller.engine.moods)) or "none installed"
            click.echo(f"mood: {self.controller.mood_label or 'off'} (available: {moods})",
                       err=True)
            return
        try:
            self.controller.set_mood(arg)
        except HyperlexError as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
        else:
            click.echo(f"mood: {self.controller.mood_label or 'off'}", err=True)

    def best_of(self, arg: str) -> None:
        from hyperlex.agent.verify import check_best_of

        if arg:
            try:
                if self.response_format is not None:
                    raise HyperlexError("a --schema reply is JSON; best-of ranks what "
                                        "replies say")
                self.controller.best_of = check_best_of(int(arg) if arg.isdigit() else arg)
            except HyperlexError as exc:
                click.secho(f"Error: {exc}", fg="red", err=True)
                return
        click.echo(f"best-of: {self.controller.best_of}", err=True)

    def turn(self, message: str, show_persona: bool = False) -> None:
        stream = self.controller.send(message, response_format=self.response_format)
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
        self._check_structured(stream.turn.reply, stream.generation.finish_reason)
        self._show_new_problems()

    def _check_structured(self, reply: str, finish_reason: str | None) -> None:
        """Say so when a structured reply is not the JSON asked for (cut by its length)."""
        from hyperlex.structured import ReplyNotValid

        if self.response_format is None:
            return
        try:
            self.response_format.parse(reply)
        except ReplyNotValid as exc:
            hint = " (raise -o max_new_tokens)" if finish_reason == "length" else ""
            click.secho(f"Warning: {exc}{hint}", fg="yellow", err=True)

    def _show_new_problems(self) -> None:
        """Report plugin failures from this turn's hooks (route_turn, on_turn) once each."""
        failures = self.controller.host.failures
        for line in failures[self._problems_shown:]:
            click.secho(f"Warning: {line}", fg="yellow", err=True)
        self._problems_shown = len(failures)
