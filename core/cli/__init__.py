"""The ``agent`` command line. Content goes to stdout; diagnostics and progress to stderr.

One module per command group; this one builds the ``agent`` group from them and is the only
module that imports them. Heavy imports (torch, transformers, peft) happen only inside
commands that load a model.
"""

from __future__ import annotations

import click

from hyperlex import __version__
from hyperlex.cli.calibrate import calibrate
from hyperlex.cli.chat import chat, route
from hyperlex.cli.common import UserErrorGroup, forget_host, get_host
from hyperlex.cli.eval import eval_group
from hyperlex.cli.export import export
from hyperlex.cli.inspect import inspect
from hyperlex.cli.listing import personas, plugins
from hyperlex.cli.persona import bench, persona
from hyperlex.cli.scene import scene
from hyperlex.cli.serve import serve
from hyperlex.cli.sessions import sessions
from hyperlex.cli.train import data, train


class AgentGroup(UserErrorGroup):
    """Adds plugin commands (``register_commands``) the first time commands are listed or
    looked up, and turns user errors into one-line messages instead of tracebacks."""

    plugin_commands_loaded = False

    def load_plugin_commands(self) -> None:
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
        self.load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            self.load_plugin_commands()
            command = super().get_command(ctx, name)
        return command


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hyperlex")
def cli() -> None:
    """hyperlex: personas as LoRA adapters on one shared base model."""


eval_group.add_command(calibrate)
for command in (personas, plugins, chat, route, train, data, eval_group, persona, bench, export,
                inspect, serve, scene, sessions):
    cli.add_command(command)
BUILTIN_COMMANDS = frozenset(cli.commands)


def reset_host() -> None:
    """Forget the host (and the plugin commands it added), e.g. after changing plugins."""
    forget_host()
    cli.plugin_commands_loaded = False
    for name in list(cli.commands):
        if name not in BUILTIN_COMMANDS:
            del cli.commands[name]


def main() -> None:
    cli(prog_name="agent")
