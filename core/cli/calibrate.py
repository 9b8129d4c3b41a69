"""``agent eval calibrate``: sweep a persona's adapter scale and recommend one.

The command is added to the ``eval`` group by :mod:`hyperlex.cli`. Its helpers from that
module (``open_engine``, the host) are imported when the command runs, since ``hyperlex.cli``
imports this module.
"""

from __future__ import annotations

import click

from hyperlex.cli.common import engine_options
from hyperlex.errors import HyperlexError
from hyperlex.eval.calibrate import (
    DEFAULT_SCALES,
    PPL_BOUND,
    check_writable,
    parse_scales,
    write_scale,
)
from hyperlex.eval.calibrate import calibrate as sweep

DEFAULT_SCALES_TEXT = ",".join(f"{s:g}" for s in DEFAULT_SCALES)


def _scales(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        return parse_scales(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.command("calibrate")
@engine_options
@click.option("-p", "--persona", "name", required=True,
              help="The persona whose adapter scale to calibrate.")
@click.option("--scales", default=DEFAULT_SCALES_TEXT, show_default=True, callback=_scales,
              help="Comma-separated adapter scales to try, each in (0, 2]; 1 is the adapter "
                   "as trained.")
@click.option("--max-ppl-ratio", "bound", default=PPL_BOUND, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="The neutral perplexity a recommended scale may reach, as a multiple of "
                   "the bare base's.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N held-out prompts (a quick check).")
@click.option("--max-new-tokens", default=100, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--write", is_flag=True,
              help="Record the recommended scale as 'scale:' in the bundle's persona.yaml "
                   "(the rest of the file is kept); it is applied whenever the adapter loads.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the full report (with sample replies) as JSON.")
def calibrate(name: str, scales: tuple[float, ...], bound: float, limit: int | None,
              max_new_tokens: int, batch_size: int, write: bool, as_json: bool,
              base: str | None, dtype: str, quantize: str | None) -> None:
    """Sweep the adapter scale of one persona and recommend the one with the best fidelity
    (share of held-out replies the persona classifier recognises) among those that keep
    neutral perplexity within 10% of the bare base (--max-ppl-ratio)."""
    from hyperlex.cli.common import emit_json, get_host, open_engine, report_problems
    from hyperlex.cli.eval import evaluable_personas
    from hyperlex.eval.fidelity import evaluation_params, load_sets
    from hyperlex.persona.bundle import BUNDLE_FILE

    host = get_host()
    report_problems(host)
    candidates = evaluable_personas(host)
    if name not in candidates:
        raise click.BadParameter(f"{name!r} is not a persona with an adapter and held-out "
                                 f"data; choose from {', '.join(sorted(candidates)) or 'none'}",
                                 param_hint="'--persona'")
    if len(candidates) < 2:
        raise HyperlexError("calibration needs at least one other persona with an adapter and "
                            "held-out data, to tell this persona's replies from")
    persona = candidates[name]
    if write:
        check_writable(persona)  # before the sweep, not after minutes of it
    sets = {n: load_sets(p) for n, p in candidates.items()}
    engine = open_engine(host, base, dtype, quantize, only=[name])
    report = sweep(engine, persona, sets[name][0], {n: s[1] for n, s in sets.items()}, scales,
                   params=evaluation_params(max_new_tokens), limit=limit,
                   batch_size=batch_size, bound=bound, progress=lambda m: click.echo(m, err=True))
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(report.table())
    if write:
        if not report.qualified:
            raise HyperlexError(f"not written: no scale kept neutral perplexity at most "
                                f"{report.bound:g}x the base's")
        assert persona.root is not None
        line = write_scale(persona, report.recommended)
        click.echo(f"{persona.root / BUNDLE_FILE}: wrote {line!r}", err=True)
