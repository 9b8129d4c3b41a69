"""Click options shared by the commands that load a model (``agent chat``, ``eval``,
``inspect``, ...), in a module of their own so command modules can use them without importing
``hyperlex.cli``."""

from __future__ import annotations

from typing import Any

import click

from hyperlex.errors import HyperlexError, UnknownPersona


class UserErrorGroup(click.Group):
    """Turns user errors into one-line messages instead of tracebacks (an unknown persona is a
    usage error), also when the group runs on its own."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UnknownPersona as exc:
            raise click.UsageError(str(exc), ctx) from None
        except HyperlexError as exc:
            raise click.ClickException(str(exc)) from None


def engine_options(func: Any) -> Any:
    """``--base``, ``--dtype`` and ``--quantize``: the options of every command that loads a
    model."""
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


def remote_options(func: Any) -> Any:
    """``--base-url`` and ``--api-key-env``: where the ``openai`` backend sends each turn."""
    func = click.option(
        "--api-key-env", default="OPENAI_API_KEY", show_default=True, metavar="VAR",
        help="Environment variable holding the server's API key (--backend openai).")(func)
    return click.option(
        "--base-url", default=None, metavar="URL", envvar="HYPERLEX_BASE_URL",
        help="OpenAI-compatible server for --backend openai, e.g. http://127.0.0.1:8000/v1 "
        "[env: HYPERLEX_BASE_URL].")(func)
