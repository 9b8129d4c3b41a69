"""The ``agent`` command line. Content goes to stdout; diagnostics and progress to stderr.

Heavy imports (torch, transformers, peft) happen only inside commands that load a model.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from hyperlex import __version__
from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.host import Host

_HOST: Host | None = None


def get_host() -> Host:
    """The process-wide plugin host, created on first use."""
    global _HOST
    if _HOST is None:
        _HOST = Host()
    return _HOST


def reset_host() -> None:
    """Forget the host (and the plugin commands it added), e.g. after changing plugins."""
    global _HOST
    _HOST = None
    cli.plugin_commands_loaded = False
    for name in list(cli.commands):
        if name not in BUILTIN_COMMANDS:
            del cli.commands[name]


def warn(message: str) -> None:
    click.secho(f"Warning: {message}", fg="yellow", err=True)


class AgentGroup(click.Group):
    """Adds plugin commands (``register_commands``) the first time commands are listed or
    looked up, and turns user errors into one-line messages instead of tracebacks."""

    plugin_commands_loaded = False

    def _load_plugin_commands(self) -> None:
        if not self.plugin_commands_loaded:
            self.plugin_commands_loaded = True
            host = get_host()
            before = dict(self.commands)
            host.add_commands(self)
            for name, command in list(self.commands.items()):
                if name in before and before[name] is not command:
                    self.commands[name] = before[name]
                    host.report(f"a plugin tried to replace the built-in command {name!r}; ignored")

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            self._load_plugin_commands()
            command = super().get_command(ctx, name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UnknownPersona as exc:
            raise click.UsageError(str(exc), ctx) from None
        except HyperlexError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hyperlex")
def cli() -> None:
    """hyperlex: personas as LoRA adapters on one shared base model."""


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _report_problems(host: Host) -> None:
    for line in host.failures:
        warn(line)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def personas(as_json: bool) -> None:
    """List installed personas (without loading any model)."""
    host = get_host()
    rows = []
    for name, reg in sorted(host.persona_registrations.items()):
        persona, info = reg.value, reg.value.adapter_info()
        rows.append(
            {
                "name": name,
                "title": persona.title,
                "description": persona.description,
                "base_model": persona.base_model,
                "plugin": reg.plugin,
                "adapter_rank": info.rank if info else None,
                "adapter_bytes": info.size_bytes if info else None,
                "path": str(persona.root) if persona.root else None,
            }
        )
    _report_problems(host)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("No personas installed.", err=True)
        return
    table = [
        (
            r["name"],
            r["title"],
            r["base_model"],
            f"r={r['adapter_rank']}" if r["adapter_rank"] else "-",
            _size(r["adapter_bytes"]),
            r["plugin"],
            r["description"],
        )
        for r in rows
    ]
    _print_table(("NAME", "TITLE", "BASE", "RANK", "SIZE", "PLUGIN", "DESCRIPTION"), table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List plugins, their versions, hooks and failures."""
    host = get_host()
    host.run_registrations()  # so that failures inside registration hooks show
    cli._load_plugin_commands()
    records = sorted(host.plugins.values(), key=lambda r: (not r.builtin, r.name))
    if as_json:
        _emit_json(
            {
                "plugins": [
                    {
                        "name": r.name,
                        "distribution": r.distribution,
                        "version": r.version,
                        "module": r.module,
                        "builtin": r.builtin,
                        "hooks": r.hooks,
                        "errors": r.errors,
                        "ok": r.ok,
                    }
                    for r in records
                ],
                "problems": host.problems,
            }
        )
        return
    _print_table(
        ("NAME", "VERSION", "SOURCE", "HOOKS", "STATUS"),
        [
            (
                r.name,
                r.version or "-",
                "built-in" if r.builtin else (r.distribution or "-"),
                ", ".join(r.hooks) or "-",
                "ok" if r.ok else "FAILED",
            )
            for r in records
        ],
    )
    for line in host.failures:
        click.secho(line, fg="red", err=True)


def _engine_options(func: Any) -> Any:
    options = [
        click.option(
            "--base",
            default=None,
            metavar="MODEL",
            help="Base model: the embedded default, a local HF model directory or a hub id.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "bfloat16"]),
            default="float32",
            show_default=True,
            help="Weight dtype of the base model.",
        ),
        click.option(
            "--quantize",
            type=click.Choice(["nf4"]),
            default=None,
            help="Load the base in 4-bit NF4 through bitsandbytes.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def open_engine(host: Host, base: str | None, dtype: str, quantize: str | None) -> Any:
    """Load the base once and attach every installed persona's adapter."""
    from hyperlex.engine_torch import TorchEngine
    from hyperlex.models import resolve_base

    resolved = resolve_base(base)
    count = len(host.personas)
    click.echo(f"Loading {resolved.name} with {count} persona{'s' * (count != 1)}...", err=True)
    engine = TorchEngine(
        list(host.personas.values()), base=resolved, dtype=dtype, quantize=quantize
    )
    for reason in engine.skipped.values():
        warn(reason)
    return engine


@cli.command()
@click.option("-p", "--persona", default=None, help="Persona to answer every turn.")
@click.option("-m", "--message", default=None, help="Send one message, print the reply, exit.")
@click.option(
    "-o",
    "--option",
    "options",
    type=(str, str),
    multiple=True,
    metavar="KEY VALUE",
    help="Generation option, e.g. -o temperature 0 -o max_new_tokens 64.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print each turn as a JSON line (persona, reason, reply, usage) instead of "
    "streaming text.",
)
@_engine_options
def chat(
    persona: str | None,
    message: str | None,
    options: tuple[tuple[str, str], ...],
    as_json: bool,
    base: str | None,
    dtype: str,
    quantize: str | None,
) -> None:
    """Chat with the personas. Interactive on a terminal; reads one message per line from a
    pipe; -m sends a single message.

    In a conversation: /persona NAME pins a persona (/persona auto unpins it), @NAME at the
    start of a message hands the conversation to NAME, /personas lists them, /help, /exit.
    """
    from hyperlex.chat import ChatLoop
    from hyperlex.controller import Controller
    from hyperlex.generation import parse_options

    host = get_host()
    overrides = parse_options(options)
    installed = host.personas  # runs the registration hooks, so their problems show below
    _report_problems(host)
    if persona is not None and persona not in installed:
        raise click.BadParameter(str(UnknownPersona(persona, list(installed))),
                                 param_hint="'--persona'")
    if not installed:
        raise HyperlexError("no personas are installed (agent plugins shows why plugins failed)")
    engine = open_engine(host, base, dtype, quantize)
    controller = Controller(host, engine, persona=persona, overrides=overrides)
    loop = ChatLoop(controller, as_json=as_json)
    if message is not None:
        loop.turn(message)
    elif sys.stdin.isatty():
        loop.interactive()
    else:
        loop.piped(sys.stdin)


BUILTIN_COMMANDS = frozenset(cli.commands)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _print_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    cli(prog_name="agent")
