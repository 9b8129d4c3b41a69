"""Click options shared by the commands that load a model (``agent chat``, ``eval``,
``inspect``, ...), in a module of their own so command modules can use them without importing
``hyperlex.cli``."""

from __future__ import annotations

from typing import Any

import click


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
