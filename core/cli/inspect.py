"""``agent inspect``: where a persona's adapter acts, per layer and token.

Content goes to stdout; diagnostics and progress to stderr. The model loads only the
personas asked for. ``hyperlex.cli`` registers the command; this module imports nothing from
it at import time (no cycle).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from hyperlex.cli.common import engine_options
from hyperlex.errors import HyperlexError, UnknownPersona


def _names(persona: str | None, compare: str | None) -> list[str]:
    if compare is not None:
        if persona is not None:
            raise click.UsageError("give either --persona or --compare, not both")
        names = list(dict.fromkeys(n.strip() for n in compare.split(",") if n.strip()))
        if len(names) < 2:
            raise click.UsageError("--compare needs at least two persona names, e.g. "
                                   "--compare philosopher,poet")
        return names
    if persona is None:
        raise click.UsageError("give a persona with -p/--persona NAME (or --compare P1,P2)")
    return [persona]


def _check_installed(host: Any, names: list[str]) -> None:
    installed = host.personas
    for name in names:
        if name not in installed:
            speakers = [n for n, p in installed.items() if not p.is_mood]
            raise click.UsageError(str(UnknownPersona(name, speakers)))
        if installed[name].adapter_dir is None:
            raise click.UsageError(
                f"persona {name!r} has no adapter (it is prompt-only): there is no LoRA "
                "contribution to inspect")


def json_text(data: Any, indent: int = 0) -> str:
    """JSON with one line per list of numbers or strings: matrices stay readable."""
    pad = "  " * (indent + 1)
    if isinstance(data, dict) and data:
        items = [f"{pad}{json.dumps(k)}: {json_text(v, indent + 1)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(data, list) and any(isinstance(v, (list, dict)) for v in data):
        items = [pad + json_text(v, indent + 1) for v in data]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json.dumps(data, ensure_ascii=False)


def _inspect_options(func: Any) -> Any:
    options = [
        click.argument("text"),
        click.option("-p", "--persona", default=None, metavar="NAME",
                     help="The persona whose adapter to inspect."),
        click.option("--compare", default=None, metavar="P1,P2[,...]",
                     help="Compare several personas on the same text: which layers carry "
                     "each."),
        click.option("--plot", "plot", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, metavar="FILE.png",
                     help="Write a heatmap PNG (layers x tokens; with --compare, layers x "
                     "personas)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the measurements as JSON."),
        click.option("--no-system", "no_system", is_flag=True,
                     help="Leave out the persona's system message (the text alone as the "
                     "user message)."),
        click.option("--all-tokens", "all_tokens", is_flag=True,
                     help="Report every prompt token (system message and template "
                     "included), not only the text and the generation prompt."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("inspect")
@engine_options
@_inspect_options
def inspect(text: str, persona: str | None, compare: str | None, plot: Path | None,
            as_json: bool, no_system: bool, all_tokens: bool, base: str | None, dtype: str,
            quantize: str | None) -> None:
    """Show where a persona's adapter acts: for each layer and token, the size of its LoRA
    update relative to the base output, ||LoRA Δ|| / ||base||.

    TEXT is sent as a user message ('-' reads it from stdin). Prints a per-layer bar chart
    and the tokens where the adapter acts most; --compare P1,P2 tabulates several personas.
    """
    from hyperlex.cli.common import get_host, open_engine

    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        raise click.UsageError("TEXT is empty: give the text to inspect")
    names = _names(persona, compare)
    host = get_host()
    try:
        _check_installed(host, names)
        engine = open_engine(host, base, dtype, quantize, only=names)
        from hyperlex.eval import activations as measure

        measure.check_adapters(engine, names)
        reports = measure.compare(engine, names, text, system=not no_system,
                                  all_tokens=all_tokens)
    except UnknownPersona as exc:
        raise click.UsageError(str(exc)) from None
    except HyperlexError as exc:
        raise click.ClickException(str(exc)) from None
    if plot is not None:
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
            if compare is not None:
                measure.plot_compare(reports, plot)
            else:
                measure.plot_heatmap(reports[0], plot)
        except OSError as exc:
            raise click.ClickException(f"cannot write {plot}: {exc.strerror or exc}") from None
        click.echo(f"Wrote {plot}", err=True)
    if as_json:
        dicts = [r.as_dict() for r in reports]
        if compare is not None:
            data: Any = {
                "text": text,
                "measure": measure.RATIO_LABEL,
                "layers": reports[0].layers,
                "layer_mean": {d["persona"]: d["layer_mean"] for d in dicts},
                "personas": dicts,
            }
        else:
            data = dicts[0]
        click.echo(json_text(data))
    elif compare is not None:
        click.echo(measure.format_compare(reports))
    else:
        click.echo(measure.format_report(reports[0]))
