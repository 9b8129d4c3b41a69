"""``agent export``: hand the installed personas to another runtime. ``agent export vllm DIR``
writes a folder vLLM serves and prints the ``vllm serve`` command for it.

The command goes to stdout, progress and diagnostics to stderr. No model is loaded (except the
one-time conversion of the embedded base with ``--with-base``); ``hyperlex.cli`` registers the
group, and its host is imported when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hyperlex.cli.common import UserErrorGroup


@click.group(cls=UserErrorGroup)
def export() -> None:
    """Export personas to serve them elsewhere."""


@export.command("vllm")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("-p", "--persona", "personas", multiple=True, metavar="NAME",
              help="Export only this persona (repeatable; default: every installed one).")
@click.option("--base", metavar="MODEL",
              help="Base model: the embedded default, a local directory or a hub id.")
@click.option("--with-base", is_flag=True,
              help="Copy the base model into DIR/base, so the vLLM machine needs no hub access.")
@click.option("--force", is_flag=True,
              help="Replace the folders and files a previous export wrote in DIR.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the manifest (also written to DIR/hyperlex-vllm.json) as JSON.")
def vllm(directory: Path, personas: tuple[str, ...], base: str | None, with_base: bool,
         force: bool, as_json: bool) -> None:
    """Write the persona adapters for vLLM and print the serve command.

    Each DIR/<persona> holds adapter_config.json and adapter_model.safetensors (the weights
    copied unchanged). Serve them with the printed `vllm serve ... --enable-lora` command and
    pick a persona with the request's `model` field; prompt-only personas are sent to the base
    by its served name. Moods are not exported: vLLM applies one adapter per request.
    """
    from hyperlex.cli.common import get_host, warn
    from hyperlex.engines.models import EMBEDDED_HUB_ID
    from hyperlex.serve.vllm import MANIFEST, PROMPT_ONLY_NOTE, export_vllm

    host = get_host()
    installed = host.personas
    for line in host.failures:
        warn(line)
    result = export_vllm(directory, installed.values(), base=base, names=personas,
                         with_base=with_base, force=force, warn=warn)
    for name, adapter in result.adapters.items():
        click.echo(f"{name}: {adapter.path} (r={adapter.rank})", err=True)
    for name in result.prompt_only:
        click.echo(f"{name}: {PROMPT_ONLY_NOTE} ({result.served_base_name})", err=True)
    for name, reason in result.skipped.items():
        click.echo(f"{name}: skipped: {reason}", err=True)
    if result.base == EMBEDDED_HUB_ID:
        click.echo(f"Note: vLLM will load {EMBEDDED_HUB_ID} from the hub; the adapters were "
                   "trained on hyperlex's dequantized copy of it, so replies may differ "
                   "slightly (--with-base ships that exact copy).", err=True)
    click.echo(f"Wrote {len(result.adapters)} adapter(s) and "
               f"{result.directory / MANIFEST}", err=True)
    if as_json:
        click.echo(json.dumps(result.manifest(), indent=2, ensure_ascii=False))
    else:
        click.echo(result.shell_command())
