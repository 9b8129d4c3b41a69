"""``agent scene``: run a scene encoder on text, score encoders against a gold set, and speak
a scene (``agent scene say``).

Content goes to stdout; diagnostics to stderr. Encoders come from the plugin host
(``register_scene_encoders``); the language pipeline of an encoder loads on first use only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from hyperlex.cli.common import engine_options, guidance_option
from hyperlex.errors import HyperlexError

DEFAULT_GOLD = Path("tests") / "data" / "scene_gold.jsonl"


def _encoders() -> dict[str, Any]:
    from hyperlex.cli.common import get_host

    return get_host().scene_encoders


def _encoder(name: str) -> Any:
    encoders = _encoders()
    if name not in encoders:
        known = ", ".join(sorted(encoders)) or "none"
        raise click.UsageError(f"unknown scene encoder {name!r}; installed encoders: {known}")
    return encoders[name]


def _run(encoder: Any, text: str) -> Any:
    from hyperlex.scene.model import Delta

    try:
        delta = encoder(text)
    except HyperlexError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # plugin code: one line, not a traceback
        raise click.ClickException(
            f"scene encoder failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(delta, Delta):
        raise click.ClickException(
            f"scene encoder returned {type(delta).__name__}, not a hyperlex.scene.model.Delta")
    return delta


def format_delta(delta: Any) -> str:
    """A readable summary of a delta: hyperlexemes, links ("cat NOT chase mouse"), field."""
    labels = {h.id: h.label for h in delta.hyperlexemes}
    lines = ["hyperlexemes:"]
    for h in delta.hyperlexemes:
        attrs = ", ".join(f"{k}={v}" for k, v in sorted(h.attrs.items()))
        lines.append(f"  {h.id} {h.label} ({h.kind}){'  ' + attrs if attrs else ''}")
    if not delta.hyperlexemes:
        lines.append("  (none)")
    lines.append("links:")
    for link in delta.links:
        neg = "NOT " if link.polarity < 0 else ""
        src, dst = labels.get(link.src, link.src), labels.get(link.dst, link.dst)
        lines.append(f"  {src} {neg}{link.rel} {dst}")
    if not delta.links:
        lines.append("  (none)")
    lines.append(f"field: {delta.field.render() if delta.field is not None else '(none)'}")
    return "\n".join(lines)


@click.group("scene")
def scene() -> None:
    """The scene: encode text into scene deltas and evaluate encoders."""


@scene.command("encode")
@click.argument("text")
@click.option("--encoder", "encoder_name", default="default", show_default=True,
              help="Name of a registered scene encoder.")
@click.option("--json", "as_json", is_flag=True, help="Print the delta as JSON (Delta.to_dict).")
def encode(text: str, encoder_name: str, as_json: bool) -> None:
    """Encode TEXT (or '-' for standard input) into a scene delta."""
    encoder = _encoder(encoder_name)
    if text == "-":
        text = sys.stdin.read()
    delta = _run(encoder, text)
    if as_json:
        click.echo(json.dumps(delta.to_dict(), ensure_ascii=False))
    else:
        click.echo(format_delta(delta))


@scene.command("eval")
@click.option("--gold", "gold", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Gold file (JSON lines). Default: {DEFAULT_GOLD} in the current directory.")
@click.option("--encoder", "encoder_name", default="default", show_default=True,
              help="Name of a registered scene encoder.")
@click.option("--json", "as_json", is_flag=True, help="Print the full scores as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Show the worst sentences on stderr.")
@click.option("--worst", default=10, show_default=True, help="How many sentences --verbose shows.")
def evaluate(gold: Path | None, encoder_name: str, as_json: bool, verbose: bool,
             worst: int) -> None:
    """Score an encoder against a gold set: hyperlexeme and link F1, negation polarity."""
    from hyperlex.eval.scene import score_encoder

    if gold is None:
        if not DEFAULT_GOLD.is_file():
            raise click.UsageError(f"no gold file at {DEFAULT_GOLD}; pass --gold FILE")
        gold = DEFAULT_GOLD
    if not gold.is_file():
        raise click.UsageError(f"gold file {str(gold)!r} does not exist")
    encoder = _encoder(encoder_name)
    try:
        report = score_encoder(encoder, gold)
    except ValueError as exc:
        raise click.ClickException(f"bad gold file: {exc}") from None
    except HyperlexError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        h, links, pol = report["hyperlexemes"], report["links"], report["polarity"]
        click.echo(f"encoder {encoder_name!r} on {report['gold']} ({report['sentences']} "
                   "sentences)")
        click.echo(f"hyperlexemes  P {h['precision']:.3f}  R {h['recall']:.3f}  "
                   f"F1 {h['f1']:.3f}")
        click.echo(f"links         P {links['precision']:.3f}  R {links['recall']:.3f}  "
                   f"F1 {links['f1']:.3f}")
        click.echo(f"polarity      accuracy {pol['accuracy']:.3f} ({pol['correct']}/"
                   f"{pol['total']} matched links; negated recall {pol['negated_recall']:.3f})")
        click.echo(f"kinds         accuracy {report['kinds']['accuracy']:.3f}")
        if report["sentences_per_second"]:
            click.echo(f"speed         {report['sentences_per_second']:.0f} sentences/s")
        for metric, met in report["met"].items():
            click.echo(f"{metric}: {'met' if met else 'NOT met'} "
                       f"(target {report['targets'][metric]})")
    if verbose:
        for entry in report["errors"][:worst]:
            click.echo(f"- {entry['text']!r}", err=True)
            for key in ("missing_hyperlexemes", "extra_hyperlexemes", "missing_links",
                        "extra_links", "wrong_polarity", "wrong_kinds"):
                if entry[key]:
                    click.echo(f"    {key}: {json.dumps(entry[key], ensure_ascii=False)}",
                               err=True)


@scene.command("say")
@click.argument("scene_file", metavar="SCENE.json")
@click.option("-p", "--persona", default="writer", show_default=True,
              help="The persona that speaks the scene.")
@click.option("--mood", "layer", default=None, metavar="LAYER[:WEIGHT]",
              help="Compose a layer over the persona: the scene-writer (--mood writer:0.5) "
              "or a mood.")
@click.option("-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Generation option over the persona's contract, e.g. -o temperature 0.")
@click.option("--check", is_flag=True,
              help="Read the reply back with --encoder and score the round trip (stderr).")
@click.option("--encoder", "encoder_name", default="default", show_default=True,
              help="Scene encoder for --check and --best-of.")
@click.option("--best-of", "best_of", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Sample N replies (seeds seed..seed+N-1), read each back with --encoder, "
              "and say the one that keeps the scene best: no negation flipped, then the most "
              "links and things kept. Needs sampling (temperature > 0).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the reply (and with --check its score) as JSON.")
@click.option("--engine", "backend", type=click.Choice(["auto", "torch", "llamacpp"]),
              default="auto", show_default=True,
              help="Inference engine (auto: llama.cpp when installed; torch with --guidance).")
@guidance_option
@engine_options
def say(scene_file: str, persona: str, layer: str | None, options: tuple[tuple[str, str], ...],
        check: bool, encoder_name: str, best_of: int, as_json: bool, backend: str,
        guidance: float, base: str | None, dtype: str, quantize: str | None) -> None:
    """Speak the scene in SCENE.json ('-': standard input) as PERSONA: the scene-writer by
    default, or any persona, with a layer composed over it.

    SCENE.json holds one scene as Scene.to_dict() gives it (what `agent sessions show --json`
    prints under "scene", or one line of an evaluation-scene file)."""
    from hyperlex.agent.moods import parse_mood
    from hyperlex.cli.common import (
        check_guidance,
        check_option,
        choose_backend,
        get_host,
        open_engine,
        sample_capacity,
    )
    from hyperlex.eval.roundtrip import read_back, read_scene_file, score_roundtrip
    from hyperlex.generation import Guidance, parse_options
    from hyperlex.persona.prompt import scene_prompt, unguided_prompt

    text = sys.stdin.read() if scene_file == "-" else None
    source = read_scene_file("<stdin>" if scene_file == "-" else scene_file, text)
    host = get_host()
    installed = host.personas
    speaker = host.persona(persona)
    if speaker.is_mood:
        raise click.BadParameter(f"{persona!r} is a mood, not a speaker", param_hint="'--persona'")
    layers_known = {n: p for n, p in installed.items() if p.is_layer}
    check_option("--mood", parse_mood, layers_known, layer)
    composed = parse_mood(layers_known, layer)
    encoder = _encoder(encoder_name) if check or best_of > 1 else None
    params = speaker.contract.params().updated(parse_options(options), "-o")
    if best_of > 1 and params.greedy:
        raise click.UsageError(f"--best-of {best_of} needs sampling: with temperature 0 every "
                               "sample is the same reply (give -o temperature 0.7)")
    backend = "torch" if guidance and backend == "auto" else backend
    check_guidance(guidance, backend)
    backend = choose_backend(backend, dtype, quantize, merge=False)
    engine = open_engine(host, base, dtype, quantize,
                         only=[persona, *([composed[0]] if composed else [])], backend=backend,
                         **sample_capacity(backend, best_of))
    engine.check_request(persona, [composed] if composed else [])
    messages = scene_prompt(engine.persona(persona), source, engine)
    layers = (composed,) if composed else ()
    guided = Guidance(guidance, [unguided_prompt(engine.persona(persona), engine)]) \
        if guidance else None
    samples: list[dict[str, Any]] = []
    chosen = 0
    if best_of > 1:
        assert encoder is not None
        chosen, samples = _best_rendering(engine, messages, persona, params, layers, best_of,
                                          source, encoder, guided)
        reply = samples[chosen]["text"]
        if not as_json:
            click.echo(reply)
    elif guided is not None:
        reply = engine.generate_batch([(messages, persona)], params, layers=layers,
                                      guidance=guided)[0].text.strip()
        if not as_json:
            click.echo(reply)
    elif as_json:
        reply = engine.generate(messages, persona, params, layers=layers).text.strip()
    else:
        pieces = []
        for piece in engine.stream(messages, persona, params, layers=layers):
            pieces.append(piece)
            click.echo(piece, nl=False)
        click.echo()
        reply = "".join(pieces).strip()
    result: dict[str, Any] = {"persona": persona, "layer": layer, "reply": reply}
    if samples:
        result["best_of"] = {"n": best_of, "chosen": chosen, "samples": samples}
        if not as_json:
            click.echo(f"best of {best_of}: sample {chosen + 1} kept the scene best", err=True)
    if encoder is not None and (check or samples):
        score = samples[chosen]["score"] if samples else score_roundtrip(
            source, read_back(_run(encoder, reply)), reply).as_dict()
        result["score"] = score
        if not as_json:
            click.echo(_score_line(score), err=True)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, indent=2))


def _best_rendering(engine: Any, messages: list[Any], persona: str, params: Any,
                    layers: tuple[Any, ...], n: int, source: Any, encoder: Any,
                    guidance: Any = None) -> tuple[int, list[dict[str, Any]]]:
    """``n`` samples of the scene (seeds ``seed + i``, decoded together; one after another
    under scene ``guidance``), each with its round-trip score, and the index of the one
    whose score ranks first (the earliest on a tie)."""
    from hyperlex.agent.verify import complete_together, sample_params
    from hyperlex.eval.roundtrip import read_back, score_roundtrip

    if guidance is not None:
        texts = [engine.generate_batch([(messages, persona)], p, layers=layers,
                                       guidance=guidance)[0].text.strip()
                 for p in sample_params(params, n)]
    else:
        texts = [c.text.strip() for c in complete_together(
            [engine.stream(messages, persona, p, layers=layers)
             for p in sample_params(params, n)])]
    scores = [score_roundtrip(source, read_back(_run(encoder, text)), text) for text in texts]
    best = max(range(n), key=lambda i: (scores[i].rank, -i))
    samples = [{"text": text, "rank": list(score.rank), "score": score.as_dict()}
               for text, score in zip(texts, scores, strict=True)]
    return best, samples


def _score_line(score: dict[str, Any]) -> str:
    h, links = score["hyperlexemes"], score["links_relaxed"]
    return (f"round trip: hyperlexemes {h['tp']}/{h['tp'] + h['fn']} kept, links "
            f"{links['tp']}/{links['tp'] + links['fn']} kept (relaxed), "
            f"{len(score['logical_loss'])} polarity flip(s), {len(score['split_links'])} split")
