"""``agent eval``: fidelity, routing, roundtrip, mood and all (calibrate: its own module)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from hyperlex.cli.common import (
    check_guidance,
    choose_backend,
    compositions,
    emit_json,
    engine_options,
    get_host,
    guidance_option,
    invocation,
    open_engine,
    report_problems,
)
from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.host import Host


@click.group(name="eval")
def eval_group() -> None:
    """Verify persona adapters: fidelity, routing, roundtrip, mood, or all of the first three;
    calibrate sweeps one persona's adapter scale.

    fidelity, routing, roundtrip, mood and all take --report DIR (report.md, report.json and
    PNG charts) and --thresholds FILE (YAML; a metric that misses its threshold makes the
    exit status 3).
    """


def _held_out_generation_options(func: Any) -> Any:
    """Options shared by the evaluations that generate on the personas' held-out prompts."""
    options = [
        click.option("-p", "--persona", "names", multiple=True,
                     help="Persona to evaluate (repeatable; default: every persona with an "
                          "adapter and held-out data)."),
        click.option("--max-new-tokens", default=100, show_default=True,
                     type=click.IntRange(1)),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1)),
        click.option("--limit", type=click.IntRange(1), default=None,
                     help="Use only the first N held-out prompts of each persona (a quick "
                          "check)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the full report (with samples) as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return engine_options(func)


def _report_options(func: Any) -> Any:
    """--report DIR and --thresholds FILE, shared by every evaluation."""
    options = [
        click.option("--report", "report_dir", default=None, metavar="DIR",
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Also write report.md, report.json and PNG charts into DIR."),
        click.option("--thresholds", "thresholds_file", default=None, metavar="FILE",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="YAML thresholds, e.g. 'roundtrip: {link_f1: 0.3}'; the exit status "
                          "is 3 when a metric misses one."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _scene_sources(ctx: click.Context, param: click.Parameter,
                   values: tuple[str, ...]) -> tuple[str | Path, ...]:
    """``heldout`` (the shipped held-out scenes) or an existing file, each."""
    for value in values:
        if value != "heldout" and not Path(value).is_file():
            raise click.BadParameter(f"{value}: no such file (or 'heldout', the shipped "
                                     "held-out scenes)", ctx, param)
    return tuple(v if v == "heldout" else Path(v) for v in values)


def _scene_options(func: Any) -> Any:
    """The round trip's scene set and encoder."""
    options = [
        click.option("--scenes", "scene_files", multiple=True, metavar="FILE|heldout",
                     callback=_scene_sources,
                     help="Add the scenes of FILE (JSON lines: Scene.to_dict() plus an id; "
                          "repeatable); 'heldout': the shipped held-out split of the "
                          "synthetic corpus."),
        click.option("--no-shipped-scenes", is_flag=True,
                     help="Leave out the scenes shipped with hyperlex (use only --scenes)."),
        click.option("--encoder", default="default", show_default=True,
                     help="Scene encoder that reads the replies back."),
        click.option("--compose", "compose", multiple=True, metavar="LAYER[:WEIGHT]",
                     help="Also score every persona with LAYER composed over it at WEIGHT "
                          "(repeatable), e.g. --compose writer:0.5 --compose writer:1."),
        click.option("-v", "--verbose", is_flag=True,
                     help="List every round-trip failure on stderr, with its scene and reply."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load_gate(path: Path | None) -> Any:
    """The thresholds of FILE, checked before anything is loaded (None without a file)."""
    if path is None:
        return None
    from hyperlex.eval.report import load_thresholds

    return load_thresholds(path)


def _finish(sections: list[Any], report_dir: Path | None, thresholds: Any,
            base: str | None = None) -> None:
    """Write the report if asked, then check the thresholds: exit 3 listing every metric
    that missed its threshold."""
    from hyperlex.eval.report import GATE_EXIT, check, write_report

    failures = check(thresholds, sections)
    if report_dir is not None:
        ctx = click.get_current_context()
        options = {k: [str(x) for x in v] if isinstance(v, tuple) else
                   (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items()}
        meta = {"command": invocation(ctx),
                "options": options, "base": base}
        write_report(report_dir, sections, meta, thresholds, failures)
        click.echo(f"report written to {report_dir / 'report.md'}", err=True)
    if thresholds is None:
        return
    if failures:
        click.secho(f"{len(failures)} metric(s) missed their threshold ({thresholds.file}):",
                    fg="red", err=True)
        for failure in failures:
            click.echo(f"  {failure.text()}", err=True)
        sys.exit(GATE_EXIT)
    applied = thresholds.count([s.name for s in sections])
    click.echo(f"thresholds met ({applied} checked, {thresholds.file})", err=True)


def _run_fidelity(host: Host, chosen: dict[str, Any], engine: Any, limit: int | None,
                  max_new_tokens: int, batch_size: int) -> Any:
    from hyperlex.eval.fidelity import evaluation_params, fidelity, load_sets

    sets = {name: load_sets(persona) for name, persona in chosen.items()}
    return fidelity(engine, chosen, {n: s[0][:limit] for n, s in sets.items()},
                    {n: s[1] for n, s in sets.items()},
                    params=evaluation_params(max_new_tokens),
                    batch_size=batch_size, progress=lambda m: click.echo(m, err=True))


def _fidelity_personas(host: Host, names: tuple[str, ...]) -> dict[str, Any]:
    chosen = {n: host.persona(n) for n in names} or evaluable_personas(host)
    if len(chosen) < 2:
        raise HyperlexError("fidelity needs at least two personas with adapters and held-out "
                            f"sets; found: {', '.join(chosen) or 'none'}")
    return chosen


def _print_fidelity(report: Any) -> None:
    from hyperlex.eval.fidelity import TARGETS

    click.echo(report.table())
    click.echo()
    for metric, met in report.verdicts().items():
        click.echo(f"{metric}: {'met' if met else 'NOT met'} (target {TARGETS[metric]})")


@eval_group.command("fidelity")
@_held_out_generation_options
@_report_options
def eval_fidelity(names: tuple[str, ...], max_new_tokens: int, batch_size: int,
                  limit: int | None, as_json: bool, base: str | None, dtype: str,
                  quantize: str | None, report_dir: Path | None,
                  thresholds_file: Path | None) -> None:
    """Base vs prompted base vs adapter on each persona's held-out prompts: blind persona
    identification (macro-F1), prompt-gain recovery, and neutral perplexity."""
    from hyperlex.eval.report import fidelity_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    report_problems(host)
    chosen = _fidelity_personas(host, names)
    for persona in chosen.values():  # a missing data file fails before the model loads
        _check_sets(persona)
    engine = open_engine(host, base, dtype, quantize, only=list(chosen))
    report = _run_fidelity(host, chosen, engine, limit, max_new_tokens, batch_size)
    if as_json:
        emit_json(report.as_dict())
    else:
        _print_fidelity(report)
    _finish([fidelity_section(report)], report_dir, thresholds, engine.base_name)


def _check_sets(persona: Any) -> None:
    from hyperlex.eval.fidelity import load_sets

    load_sets(persona)


def evaluable_personas(host: Host) -> dict[str, Any]:
    """Personas (not moods) with a trained adapter and the held-out set their train.yaml
    names."""
    from hyperlex.training.train import load_config

    return {n: p for n, p in host.personas.items()
            if not p.is_mood and p.adapter_dir is not None and p.root
            and (p.root / load_config(p.root).heldout).is_file()}


def _chosen(candidates: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The ``-p`` personas among ``candidates`` (all of them without ``-p``)."""
    for name in names:
        if name not in candidates:
            raise click.BadParameter(f"{name!r} is not a persona with an adapter and held-out "
                                     f"data; choose from {', '.join(sorted(candidates))}",
                                     param_hint="'--persona'")
    return {n: candidates[n] for n in names} or candidates


def _shipped_routing_cases() -> Path:
    from importlib import resources

    return Path(str(resources.files("hyperlex").joinpath("eval/data/routing.jsonl")))


def _run_routing(host: Host, cases: Any, router: str) -> Any:
    from hyperlex.agent.router import TurnRouter
    from hyperlex.eval.routing import evaluate_routing

    speakers = {n: p for n, p in host.personas.items() if not p.is_mood}
    return evaluate_routing(TurnRouter(host, speakers, None if router == "none" else router),
                            cases)


def _routing_cases(host: Host, path: Path) -> Any:
    from hyperlex.eval.routing import load_cases

    return load_cases(path, {n for n, p in host.personas.items() if not p.is_mood})


def _print_routing(report: Any) -> None:
    click.echo(report.table())
    for error in report.errors:
        click.echo(f"  {error['kind']}: {error['message']!r} -> {error['got']} "
                   f"(expected {error['expected']})", err=True)


@eval_group.command("routing")
@click.argument("cases", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--router", default="embedding", show_default=True, help="Automatic router.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (with errors) as JSON.")
@_report_options
def eval_routing(cases: Path | None, router: str, as_json: bool, report_dir: Path | None,
                 thresholds_file: Path | None) -> None:
    """Routing accuracy on the labelled set CASES (JSON lines: message, expected, kind,
    current), per kind: explicit @addresses, requests in words, implicit messages. Without
    CASES, the set shipped with hyperlex (for the built-in cast)."""
    from hyperlex.eval.report import routing_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    report_problems(host)
    cases = cases or _shipped_routing_cases()
    report = _run_routing(host, _routing_cases(host, cases), router)
    if as_json:
        emit_json(report.as_dict())
    else:
        _print_routing(report)
    _finish([routing_section(report, str(cases))], report_dir, thresholds)


def _roundtrip_personas(host: Host, names: tuple[str, ...]) -> dict[str, Any]:
    """The -p personas, or every persona (not mood) with an adapter."""
    if names:
        chosen = {n: host.persona(n) for n in names}
        for name, persona in chosen.items():
            if persona.is_mood:
                speakers = [n for n, p in host.personas.items() if not p.is_mood]
                raise click.BadParameter(str(UnknownPersona(name, speakers)),
                                         param_hint="'--persona'")
        return chosen
    chosen = {n: p for n, p in host.personas.items()
              if not p.is_mood and p.adapter_dir is not None}
    if not chosen:
        raise HyperlexError("no persona with an adapter to evaluate (agent personas lists them)")
    return chosen


def _scene_encoder(host: Host, name: str) -> Any:
    encoders = host.scene_encoders
    if name not in encoders:
        raise click.BadParameter(f"unknown encoder {name!r}; registered encoders: "
                                 f"{', '.join(sorted(encoders)) or 'none'}",
                                 param_hint="'--encoder'")
    return encoders[name]


def _eval_scenes(scene_files: tuple[Path, ...], no_shipped: bool, limit: int | None) -> Any:
    from hyperlex.eval.roundtrip import load_scenes

    if no_shipped and not scene_files:
        raise click.UsageError("--no-shipped-scenes needs at least one --scenes FILE")
    return load_scenes(scene_files, shipped=not no_shipped)[:limit]


def _run_roundtrip(engine: Any, chosen: dict[str, Any], explicit: bool, scenes: Any,
                   encoder: Any, encoder_name: str, max_new_tokens: int,
                   batch_size: int, layers: list[tuple[str, float]],
                   guidance: float = 0.0) -> Any:
    from hyperlex.eval.roundtrip import roundtrip, speaking_params

    skipped = [n for n in chosen if n in engine.skipped]
    if explicit and skipped:
        raise HyperlexError(engine.skipped[skipped[0]])
    speakers = {n: p for n, p in chosen.items() if n not in engine.skipped}
    if not speakers:
        raise HyperlexError("no persona left to evaluate: every adapter was skipped")
    for layer, _ in layers:
        if layer not in engine.moods:
            raise HyperlexError(engine.skipped.get(layer, f"layer {layer!r} is not loaded"))
    return roundtrip(engine, speakers, scenes, encoder,
                     params=speaking_params(max_new_tokens), batch_size=batch_size,
                     progress=lambda m: click.echo(m, err=True), encoder_name=encoder_name,
                     layers=tuple(layers), guidance=guidance)


def _print_roundtrip(report: Any, verbose: bool) -> None:
    click.echo(report.table())
    for name in report.personas:
        c = report.counts[name]
        click.echo(f"{name}: {c['split_links']}/{c['source_links']} links split "
                   f"({c['broken_links']} broken, {c['endpoint_lost']} with an endpoint lost), "
                   f"{c['details_lost']}/{c['details']} details lost, "
                   f"{c['polarity_flips']}/{c['matched_links']} matched links flipped "
                   f"({c['negation_lost']} negations lost, {c['negation_invented']} "
                   "invented)", err=True)
    if verbose:
        for failure in report.failures():
            reply = " ".join(failure["reply"].split())
            reply = reply if len(reply) <= 100 else reply[:97] + "..."
            click.echo(f"  {failure['persona']} {failure['scene']}: {failure['mode']}: "
                       f"{failure['detail']} | reply: {reply!r}", err=True)
    elif any(report.counts[n]["split_links"] or report.counts[n]["details_lost"]
             or report.counts[n]["polarity_flips"] for n in report.personas):
        click.echo("(-v lists every failure with its scene and reply; --json and --report "
                   "keep them all)", err=True)


@eval_group.command("roundtrip")
@click.option("-p", "--persona", "names", multiple=True,
              help="Persona to evaluate (repeatable; default: every persona with an adapter).")
@_scene_options
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N scenes (a quick check).")
@click.option("--max-new-tokens", default=120, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True,
              help="Print the full report (every reply, what was read back, its score) as JSON.")
@_report_options
@click.option("--engine", "backend", type=click.Choice(["torch", "llamacpp"]),
              default="torch", show_default=True,
              help="Where the replies are generated: torch (batched), or llama.cpp's exact "
                   "mode (an F32 GGUF of the base: the same greedy replies but for near-ties; "
                   "one reply at a time, slower here, see docs/verification.md).")
@guidance_option
@engine_options
def eval_roundtrip(names: tuple[str, ...], scene_files: tuple[Path, ...],
                   no_shipped_scenes: bool, encoder: str, compose: tuple[str, ...],
                   verbose: bool, limit: int | None,
                   max_new_tokens: int, batch_size: int, as_json: bool,
                   report_dir: Path | None, thresholds_file: Path | None, backend: str,
                   guidance: float, base: str | None, dtype: str,
                   quantize: str | None) -> None:
    """Scene -> text -> scene: each persona speaks every scene (its contract with the whole
    scene, greedy) and the encoder reads the reply back. Per persona: hyperlexeme recall and
    precision, link F1 (strict and relaxed), and the failure modes: split links,
    impoverished associations, logical loss (polarity flips).

    --compose writer:0.5 adds a row per persona speaking with the scene-writer composed
    over it at weight 0.5. --engine llamacpp generates on llama.cpp's exact mode instead of
    the torch engine. --guidance 3 decodes every reply with scene guidance (torch only)."""
    from hyperlex.eval.report import roundtrip_section

    check_guidance(guidance, backend)
    thresholds = _load_gate(thresholds_file)
    host = get_host()
    report_problems(host)
    scenes = _eval_scenes(scene_files, no_shipped_scenes, limit)
    reader = _scene_encoder(host, encoder)
    chosen = _roundtrip_personas(host, names)
    layers = compositions(host, compose)
    backend = choose_backend(backend, dtype, quantize, merge=False)
    engine = open_engine(host, base, dtype, quantize,
                         only=[*chosen, *(layer for layer, _ in layers)], backend=backend,
                         exact=True)
    report = _run_roundtrip(engine, chosen, bool(names), scenes, reader, encoder,
                            max_new_tokens, batch_size, layers, guidance)
    if as_json:
        emit_json(report.as_dict())
    else:
        _print_roundtrip(report, verbose)
    _finish([roundtrip_section(report, [str(f) for f in scene_files])], report_dir,
            thresholds, engine.base_name)


@eval_group.command("all")
@_held_out_generation_options
@click.option("--cases", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Routing set (default: the one shipped with hyperlex).")
@click.option("--router", default="embedding", show_default=True,
              help="Automatic router to measure.")
@_scene_options
@_report_options
@guidance_option
def eval_all(names: tuple[str, ...], max_new_tokens: int, batch_size: int, limit: int | None,
             as_json: bool, base: str | None, dtype: str, quantize: str | None,
             cases: Path | None, router: str, scene_files: tuple[Path, ...],
             no_shipped_scenes: bool, encoder: str, compose: tuple[str, ...], verbose: bool,
             report_dir: Path | None, thresholds_file: Path | None, guidance: float) -> None:
    """Fidelity, routing and roundtrip in one run: one model load, one report and one gate.

    -p and --limit apply to fidelity (held-out prompts) and roundtrip (scenes); --guidance
    to roundtrip."""
    from hyperlex.eval.report import fidelity_section, roundtrip_section, routing_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    report_problems(host)
    chosen = _fidelity_personas(host, names)
    for persona in chosen.values():
        _check_sets(persona)
    cases = cases or _shipped_routing_cases()
    routing_cases = _routing_cases(host, cases)
    scenes = _eval_scenes(scene_files, no_shipped_scenes, limit)
    reader = _scene_encoder(host, encoder)
    layers = compositions(host, compose)
    click.echo("routing", err=True)
    routing_report = _run_routing(host, routing_cases, router)
    engine = open_engine(host, base, dtype, quantize,
                         only=[*chosen, *(layer for layer, _ in layers)])
    fidelity_report = _run_fidelity(host, chosen, engine, limit, max_new_tokens, batch_size)
    click.echo("round trip", err=True)
    roundtrip_report = _run_roundtrip(engine, chosen, True, scenes, reader, encoder,
                                      max_new_tokens, batch_size, layers, guidance)
    if as_json:
        emit_json({"fidelity": fidelity_report.as_dict(), "routing": routing_report.as_dict(),
                    "roundtrip": roundtrip_report.as_dict()})
    else:
        click.echo("## fidelity\n")
        _print_fidelity(fidelity_report)
        click.echo("\n## routing\n")
        _print_routing(routing_report)
        click.echo("\n## roundtrip\n")
        _print_roundtrip(roundtrip_report, verbose)
    sections = [fidelity_section(fidelity_report), routing_section(routing_report, str(cases)),
                roundtrip_section(roundtrip_report, [str(f) for f in scene_files])]
    _finish(sections, report_dir, thresholds, engine.base_name)


@eval_group.command("mood")
@click.option("--mood", "mood", default="melancholic", show_default=True,
              help="The mood layer to measure.")
@click.option("--weight", default=1.0, show_default=True, type=click.FloatRange(0, 2,
              min_open=True), help="Weight of the mood adapter.")
@_held_out_generation_options
@_report_options
def eval_mood(mood: str, weight: float, names: tuple[str, ...], max_new_tokens: int,
              batch_size: int, limit: int | None, as_json: bool, base: str | None, dtype: str,
              quantize: str | None, report_dir: Path | None,
              thresholds_file: Path | None) -> None:
    """How far a mood layer shifts each persona's valence, and whether the persona stays
    recognisable (fidelity classifier accuracy), on the held-out prompts."""
    from hyperlex.eval.fidelity import evaluation_params, load_sets
    from hyperlex.eval.mood import mood_shift
    from hyperlex.eval.report import mood_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    report_problems(host)
    installed = host.personas
    if mood not in installed or not installed[mood].is_mood:
        moods = [n for n, p in installed.items() if p.is_mood]
        raise click.BadParameter(str(UnknownPersona(mood, moods, kind="mood")),
                                 param_hint="'--mood'")
    if installed[mood].adapter_dir is None:
        raise HyperlexError(f"mood {mood!r} has no adapter to measure; train it with "
                            f"agent train {installed[mood].root}")
    candidates = evaluable_personas(host)
    chosen = _chosen(candidates, names)
    sets = {name: load_sets(persona) for name, persona in candidates.items()}
    engine = open_engine(host, base, dtype, quantize, only=[*candidates, mood])
    report = mood_shift(
        engine, chosen, {n: sets[n][0][:limit] for n in chosen},
        {n: s[1] for n, s in sets.items()}, mood, weight, load_sets(installed[mood])[1],
        host.scene_encoders["default"], params=evaluation_params(max_new_tokens),
        batch_size=batch_size, progress=lambda m: click.echo(m, err=True))
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(report.table())
    _finish([mood_section(report)], report_dir, thresholds, engine.base_name)


@eval_group.command("negation")
@click.option("-p", "--persona", "names", multiple=True,
              help="Persona to evaluate (repeatable; default: every persona with an adapter "
                   "and held-out data).")
@click.option("--statements", "statements_file", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="User messages stating a negated fact, one per line (default: the 48 "
                   "shipped held-out statements).")
@click.option("--compose", "compose", multiple=True, metavar="LAYER[:WEIGHT]",
              help="Also answer with LAYER composed over each persona (repeatable), e.g. "
                   "--compose writer:0.5.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed of every reply.")
@click.option("--best-of", "best_of", type=click.IntRange(1, 16), default=1, show_default=True,
              metavar="N",
              help="Answer as agent chat --best-of N does: N samples (seeds SEED to SEED+N-1), "
              "the one that keeps the statement best, then reads most as the persona's.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N statements (a quick check).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True,
              help="Print the report with every reply and its verdict as JSON.")
@_report_options
@guidance_option
@engine_options
def eval_negation(names: tuple[str, ...], statements_file: Path | None, compose: tuple[str, ...],
                  seed: int, best_of: int, limit: int | None, batch_size: int, as_json: bool,
                  report_dir: Path | None, thresholds_file: Path | None, guidance: float,
                  base: str | None, dtype: str, quantize: str | None) -> None:
    """Does each persona keep a negated fact the user states? Each statement opens a
    conversation ("The old fisherman does not trust the sea."), the persona answers as in
    agent chat (its contract's sampling, seeded), and the default encoder reads the reply
    back. Per persona: the share of replies that keep every negated fact, that flip one, that
    the fidelity classifier gives to the persona, and that do both (docs/verification.md).
    --guidance W decodes every reply with scene guidance against the same conversation
    without its scene."""
    from hyperlex.cli.command_refs import CommandReferences
    from hyperlex.eval.fidelity import PersonaClassifier, load_sets
    from hyperlex.eval.negation import load_statements, negation_eval
    from hyperlex.eval.report import negation_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    report_problems(host)
    encoder = host.scene_encoders["default"]
    statements = load_statements(encoder, statements_file)[:limit]
    candidates = {n: p for n, p in evaluable_personas(host).items() if not p.is_layer}
    chosen = _chosen(candidates, names)
    layers = compositions(host, compose)
    click.echo("fitting the voice classifier", err=True)
    classifier = PersonaClassifier({n: load_sets(p)[1] for n, p in candidates.items()})
    engine = open_engine(host, base, dtype, quantize,
                         only=[*chosen, *(layer for layer, _ in layers)])
    report = negation_eval(engine, chosen, statements, encoder, classifier, seed, tuple(layers),
                           batch_size, progress=lambda m: click.echo(m, err=True),
                           best_of=best_of, guidance=guidance,
                           reply_problem=CommandReferences.of_this_cli(host.personas).problem)
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(report.table())
    _finish([negation_section(report)], report_dir, thresholds, engine.base_name)
