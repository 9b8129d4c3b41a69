"""``agent chat`` and ``agent route``: talk to the personas, or see who would answer."""

from __future__ import annotations

import sys

import click

from hyperlex.cli.common import (
    check_option,
    choose_backend,
    emit_json,
    engine_options,
    get_host,
    open_engine,
    remote_options,
    report_problems,
    sample_capacity,
    warm_up_encoders,
    warn,
)
from hyperlex.errors import HyperlexError, UnknownPersona


@click.command()
@click.option("-p", "--persona", default=None,
              help="Persona to answer every turn; 'auto' routes each turn. Default: auto, or "
              "the persona a resumed session had pinned.")
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
@click.option("--mood", default=None, metavar="NAME[:WEIGHT]",
              help="Compose a layer over every persona: a mood (--mood melancholic:0.7) or the "
              "scene-writer (--mood writer:0.5).")
@click.option("--schema", "schema_file", default=None, metavar="FILE",
              type=click.Path(dir_okay=False),
              help="Answer every turn with JSON matching the JSON Schema in FILE (decoded "
              "under its grammar); '{\"type\": \"object\"}' asks for any JSON object.")
@click.option("--max-string-length", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --schema: hold every string the schema leaves unbounded to N "
              "characters, so a small model's string cannot run the reply past max_new_tokens.")
@click.option("--best-of", "best_of", type=click.IntRange(1, 16), default=1, show_default=True,
              metavar="N",
              help="Sample N replies per turn and answer with the one that keeps the user's "
              "facts best (negations first), then reads most as the persona's own "
              "(docs/verification.md#best-of-n-replies-agent-chat---best-of).")
@click.option("--router", default="embedding", show_default=True,
              help="Automatic router for unaddressed turns ('none': keep the current persona).")
@click.option("-s", "--session", default=None, metavar="NAME",
              help="Save the conversation as session NAME, resuming it (history, scene, "
              "persona, mood) if it exists. Default: a new session.")
@click.option("--no-store", is_flag=True, help="Do not save this conversation.")
@click.option("--merge", is_flag=True,
              help="Fold the speaking persona's adapter into the base weights: faster replies "
              "for long runs with one persona, about 0.1 s more per switch (float32 only).")
@click.option("--engine", "--backend", "backend",
              type=click.Choice(["auto", "torch", "llamacpp", "openai"]),
              default="auto", show_default=True,
              help="Inference engine; auto: llama.cpp when installed (several times faster "
              "on a CPU), else transformers + PEFT; openai: an OpenAI-compatible server "
              "(vLLM, agent serve) at --base-url generates, the scene stays here.")
@remote_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print each turn as a JSON line (persona, route, reply, usage) instead of "
    "streaming text.",
)
@engine_options
def chat(
    persona: str | None,
    message: str | None,
    options: tuple[tuple[str, str], ...],
    mood: str | None,
    schema_file: str | None,
    max_string_length: int | None,
    best_of: int,
    router: str,
    session: str | None,
    no_store: bool,
    merge: bool,
    backend: str,
    base_url: str | None,
    api_key_env: str,
    as_json: bool,
    base: str | None,
    dtype: str,
    quantize: str | None,
) -> None:
    """Chat with the personas. Interactive on a terminal; reads one message per line from a
    pipe; -m sends a single message.

    Each turn goes to the pinned persona, an @NAME address, a request in words ("let the
    poet answer: ..."), or the automatic router. In a conversation: /persona NAME pins a
    persona (/persona auto routes again), /why explains the last choice, /scene shows the
    shared scene, /mood NAME adds a mood layer, /help lists the rest.
    """
    from hyperlex.agent.controller import Controller
    from hyperlex.agent.moods import parse_mood
    from hyperlex.agent.router import check_router
    from hyperlex.agent.store import Store
    from hyperlex.cli.repl import ChatLoop
    from hyperlex.generation import parse_options

    host = get_host()
    overrides = parse_options(options)
    response_format = None
    if max_string_length is not None and schema_file is None:
        raise click.UsageError("--max-string-length bounds the strings of a --schema; give one")
    if best_of > 1 and schema_file is not None:
        raise click.UsageError("--best-of ranks replies by what they say; a --schema reply is "
                               "JSON, so give one or the other")
    if schema_file is not None:
        from hyperlex.structured import load_schema

        response_format = load_schema(schema_file, max_string_length)
    installed = host.personas  # runs the registration hooks, so their problems show below
    report_problems(host)
    speakers = [n for n, p in installed.items() if not p.is_mood]
    if persona not in (None, "auto") and persona not in speakers:
        raise click.BadParameter(str(UnknownPersona(persona, speakers)), param_hint="'--persona'")
    if not speakers:
        raise HyperlexError("no personas are installed (agent plugins shows why plugins failed)")
    check_option("--mood", parse_mood, {n: p for n, p in installed.items() if p.is_layer},
                 mood)
    check_option("--router", check_router, host, router)
    if no_store and session:
        raise click.UsageError("--session and --no-store contradict each other")
    if session is not None:
        from hyperlex.agent.store import check_name

        check_name(session)
    if base_url and backend == "auto":
        backend = "openai"
    elif base_url and backend != "openai":
        warn(f"--base-url / HYPERLEX_BASE_URL is ignored with --engine {backend}")
    chosen = choose_backend(backend, dtype, quantize, merge)
    if chosen == "llamacpp":  # the scene encoders load while llama.cpp loads and prefills
        warm_up_encoders(host)
    from hyperlex.training.distill import api_key_from

    engine = open_engine(host, base, dtype, quantize, merge=merge, backend=chosen,
                         base_url=base_url, api_key=api_key_from(api_key_env),
                         **sample_capacity(chosen, best_of))
    from hyperlex.cli.command_refs import CommandReferences
    from hyperlex.eval.fidelity import voice_scorer

    controller = Controller(host, engine, persona=persona, overrides=overrides,
                            router=None if router == "none" else router, mood=mood,
                            store=None if no_store else Store(), session=session,
                            best_of=best_of, voice=voice_scorer(engine.personas),
                            reply_problem=CommandReferences.of_this_cli(host.personas).problem)
    if controller.session is not None:
        resumed = f", resumed at turn {controller.first_index}" if controller.first_index else ""
        click.echo(f"session {controller.session}{resumed}", err=True)
    if chosen == "llamacpp":
        controller.prefill()
    loop = ChatLoop(controller, as_json=as_json, response_format=response_format)
    if message is not None:
        loop.turn(message)
    elif sys.stdin.isatty():
        loop.interactive()
    else:
        loop.piped(sys.stdin)


@click.command()
@click.argument("text")
@click.option("--current", default=None, metavar="NAME",
              help="The persona that answered the previous turn (hysteresis keeps it).")
@click.option("-s", "--session", default=None, metavar="NAME",
              help="Route as the next turn of a saved session (its scene and current persona).")
@click.option("--router", default="embedding", show_default=True,
              help="Automatic router ('none': only explicit choices and requests in words).")
@click.option("--json", "as_json", is_flag=True, help="Print the decision with all scores.")
def route(text: str, current: str | None, session: str | None, router: str,
          as_json: bool) -> None:
    """Show which persona would answer TEXT and why, without loading a language model."""
    from hyperlex.agent.router import TurnRouter
    from hyperlex.scene.model import Scene

    host = get_host()
    speakers = {n: p for n, p in host.personas.items() if not p.is_mood}
    report_problems(host)
    scene = None
    if session is not None:
        from hyperlex.agent.store import Store

        with Store() as store:
            record = store.session(session)
        saved = record.latest_scene()
        scene = Scene.from_json(saved) if saved else None
        if current is None and record.turns:
            current = record.turns[-1]["persona"]
    if current is not None and current not in speakers:
        raise click.BadParameter(str(UnknownPersona(current, list(speakers))),
                                 param_hint="'--current'")
    decision = TurnRouter(host, speakers, None if router == "none" else router).decide(
        text, scene, current)
    if as_json:
        emit_json(decision.as_dict())
        return
    click.echo(f"{decision.persona}  ({decision.reason})")
    for name, score in sorted(decision.scores.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {name:<12} {score:.3f}", err=True)


