"""The ``agent`` command line. Content goes to stdout; diagnostics and progress to stderr.

Heavy imports (torch, transformers, peft) happen only inside commands that load a model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from hyperlex import __version__
from hyperlex.cli_options import (
    UserErrorGroup,
    engine_options,
    remote_options,
)
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


class AgentGroup(UserErrorGroup):
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
                "kind": persona.kind,
                "title": persona.title,
                "description": persona.description,
                "base_model": persona.base_model,
                "plugin": reg.plugin,
                "adapter_rank": info.rank if info else None,
                "adapter_scale": persona.scale,
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
            r["name"] + (" (mood)" if r["kind"] == "mood" else ""),
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


def open_engine(host: Host, base: str | None, dtype: str, quantize: str | None,
                only: list[str] | None = None, merge: bool = False,
                backend: str = "torch", parallel: int = 1, base_url: str | None = None,
                api_key: str | None = None) -> Any:
    """Load the base once and attach every installed persona's adapter (or ``only`` these);
    ``backend`` "torch", "llamacpp" or "openai" (the server at ``base_url`` generates; see
    :func:`choose_backend`). ``parallel``: turns run at once (llama.cpp contexts, or rows of
    one torch batch)."""
    from hyperlex.models import resolve_base

    resolved = resolve_base(base)
    personas = [p for n, p in host.personas.items() if only is None or n in only]
    speakers = sum(not p.is_mood for p in personas)
    moods = len(personas) - speakers
    also = f" and {moods} mood{'s' * (moods != 1)}" if moods else ""
    if backend == "openai" and not base_url:
        raise click.UsageError("--backend openai needs --base-url URL (e.g. "
                               "http://127.0.0.1:8000/v1)")
    where = {"llamacpp": " on llama.cpp", "openai": f" served by {base_url}"}.get(backend, "")
    click.echo(f"Loading {resolved.name} with {speakers} persona{'s' * (speakers != 1)}{also}"
               f"{where}...", err=True)
    if backend == "llamacpp":
        from hyperlex.engine_llamacpp import LlamaCppEngine

        engine: Any = LlamaCppEngine(personas, base=resolved, contexts=parallel)
    elif backend == "openai":
        from hyperlex.engine_openai import OpenAIEngine

        engine = OpenAIEngine(personas, base_url, api_key=api_key, base=resolved)
    else:
        from hyperlex.engine_torch import TorchEngine

        engine = TorchEngine(personas, base=resolved, dtype=dtype, quantize=quantize,
                             merge=merge, max_batch=parallel)
    for reason in engine.skipped.values():
        warn(reason)
    return engine


def warm_up_encoders(host: Host) -> None:
    """Call each installed persona's scene encoder's optional ``warm_up()`` in a background
    thread (errors are left for the first real call to report)."""
    import contextlib
    import threading

    wanted = {p.scene_encoder for p in host.personas.values()} | {"default"}
    encoders = [e for n, e in host.scene_encoders.items() if n in wanted]

    def warm() -> None:
        for encoder in encoders:
            with contextlib.suppress(Exception):  # the first real call reports it
                getattr(encoder, "warm_up", lambda: None)()

    threading.Thread(target=warm, name="hyperlex-warm-up", daemon=True).start()


def choose_backend(requested: str, dtype: str, quantize: str | None, merge: bool) -> str:
    """``auto``: llama.cpp when it is installed and no torch-only option was given."""
    from hyperlex.engine_llamacpp import available

    torch_only = [flag for flag, given in (("--dtype bfloat16", dtype != "float32"),
                                           ("--quantize", quantize is not None),
                                           ("--merge", merge)) if given]
    if requested == "openai" and torch_only:
        raise click.UsageError(f"{', '.join(torch_only)} applies to the torch engine; with "
                               "--backend openai the server runs the model")
    if requested == "auto":
        return "llamacpp" if available() and not torch_only else "torch"
    if requested == "llamacpp":
        if torch_only:
            raise click.UsageError(f"{', '.join(torch_only)} applies to the torch engine; the "
                                   "llama.cpp engine runs the base GGUF as it is")
        if not available():
            raise HyperlexError("--engine llamacpp needs llama-cpp-python: pip install "
                                "'hyperlex[llamacpp]'")
    return requested


@cli.command()
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
              help="Compose a mood layer over every persona, e.g. --mood melancholic:0.7.")
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
    from hyperlex.chat import ChatLoop
    from hyperlex.controller import Controller
    from hyperlex.generation import parse_options
    from hyperlex.store import Store

    host = get_host()
    overrides = parse_options(options)
    installed = host.personas  # runs the registration hooks, so their problems show below
    _report_problems(host)
    speakers = [n for n, p in installed.items() if not p.is_mood]
    if persona not in (None, "auto") and persona not in speakers:
        raise click.BadParameter(str(UnknownPersona(persona, speakers)), param_hint="'--persona'")
    if not speakers:
        raise HyperlexError("no personas are installed (agent plugins shows why plugins failed)")
    moods = [n for n, p in installed.items() if p.is_mood]
    if mood is not None and mood.partition(":")[0] not in (*moods, "off", "none"):
        raise click.BadParameter(str(UnknownPersona(mood.partition(":")[0], moods, kind="mood")),
                                 param_hint="'--mood'")
    if router != "none" and router not in host.routers:
        known = ", ".join(sorted(host.routers)) or "none"
        raise click.BadParameter(f"unknown router {router!r}; registered routers: {known}",
                                 param_hint="'--router'")
    if no_store and session:
        raise click.UsageError("--session and --no-store contradict each other")
    if session is not None:
        from hyperlex.store import check_name

        check_name(session)
    if base_url and backend == "auto":
        backend = "openai"
    elif base_url and backend != "openai":
        warn(f"--base-url / HYPERLEX_BASE_URL is ignored with --engine {backend}")
    chosen = choose_backend(backend, dtype, quantize, merge)
    if chosen == "llamacpp":  # the scene encoders load while llama.cpp loads and prefills
        warm_up_encoders(host)
    from hyperlex.distill import api_key_from

    engine = open_engine(host, base, dtype, quantize, merge=merge, backend=chosen,
                         base_url=base_url, api_key=api_key_from(api_key_env))
    store = None if no_store else Store()
    if store is not None and session is None:
        session = store.open_session().info.name
    controller = Controller(host, engine, persona=persona, overrides=overrides,
                            router=None if router == "none" else router, mood=mood,
                            store=store, session=session)
    if session is not None:
        resumed = f", resumed at turn {controller.first_index}" if controller.first_index else ""
        click.echo(f"session {session}{resumed}", err=True)
    if chosen == "llamacpp":
        controller.prefill()
    loop = ChatLoop(controller, as_json=as_json)
    if message is not None:
        loop.turn(message)
    elif sys.stdin.isatty():
        loop.interactive()
    else:
        loop.piped(sys.stdin)


@cli.command()
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
    from hyperlex.router import TurnRouter
    from hyperlex.scene import Scene

    host = get_host()
    speakers = {n: p for n, p in host.personas.items() if not p.is_mood}
    _report_problems(host)
    scene = None
    if session is not None:
        from hyperlex.store import Store

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
        _emit_json(decision.as_dict())
        return
    click.echo(f"{decision.persona}  ({decision.reason})")
    for name, score in sorted(decision.scores.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {name:<12} {score:.3f}", err=True)


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--r", "r", type=int, help="LoRA rank.")
@click.option("--alpha", type=int, help="LoRA alpha.")
@click.option("--dropout", type=float, help="LoRA dropout.")
@click.option("--target-modules", help="Comma-separated module names, e.g. q_proj,v_proj.")
@click.option("--lr", "learning_rate", type=float, help="Learning rate.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--max-length", type=int, help="Tokens per exchange (longer ones are cut).")
@click.option("--seed", type=int)
@click.option("--save-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Dtype the adapter weights are stored in.")
@click.option("--data", help="Training set, relative to the bundle.")
@click.option("--heldout", help="Held-out set, relative to the bundle.")
@click.option("--qlora/--no-qlora", default=None,
              help="QLoRA: 4-bit NF4 base through bitsandbytes (default: from train.yaml).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations during the backward pass: much less memory, about "
              "a third more time per step (default: from train.yaml).")
@click.option("--base", default=None, metavar="MODEL", help="Base model (default: embedded).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint Ctrl-C saved.")
@click.option("--json", "as_json", is_flag=True, help="Print the training card as JSON.")
def train(bundle: Path, base: str | None, resume: bool, as_json: bool, **options: Any) -> None:
    """Train the LoRA adapter of the persona bundle BUNDLE.

    Options come from BUNDLE/train.yaml, then these overrides. Ctrl-C saves a checkpoint;
    --resume continues from it.
    """
    from hyperlex.train import TrainingInterrupted, load_config
    from hyperlex.train import train as run_training

    config = load_config(bundle, options)
    click.echo(f"Training {bundle} ({'QLoRA' if config.qlora else 'LoRA'} r={config.r} "
               f"alpha={config.alpha}, {config.epochs} epochs)", err=True)
    try:
        card = run_training(bundle, config, base=base, resume=resume)
    except TrainingInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(130)
    if as_json:
        _emit_json(card)
        return
    click.echo(f"adapter written to {bundle / 'adapter'} ({_size(card['adapter_bytes'])})")
    click.echo(f"loss {card['first_loss']:.3f} -> {card['final_loss']:.3f}"
               + (f", held-out {card['heldout_loss']:.3f}" if card["heldout_loss"] else "")
               + f"; {card['wall_seconds']:.0f} s, peak memory {card['peak_memory_mb']:.0f} MB")


@cli.group()
def data() -> None:
    """Validate and build training data."""


@data.command("validate")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def data_validate(files: tuple[Path, ...], as_json: bool) -> None:
    """Check JSONL datasets; every bad record is listed with its line number."""
    from hyperlex.data import DataError, read_dataset

    report, failed = [], False
    for file in files:
        try:
            report.append({"file": str(file), "records": len(read_dataset(file)), "problems": []})
        except DataError as exc:
            report.append({"file": str(file), "records": None, "problems": exc.problems})
            failed = True
        except HyperlexError as exc:
            report.append({"file": str(file), "records": None, "problems": [str(exc)]})
            failed = True
    if as_json:
        _emit_json(report)
    else:
        for entry in report:
            if entry["problems"]:
                for line in entry["problems"]:
                    click.echo(line)
            else:
                click.echo(f"{entry['file']}: {entry['records']} records OK")
    if failed:
        sys.exit(1)


@data.command("distill")
@click.option("-p", "--persona", required=True, help="Persona whose contract prompts the teacher.")
@click.option("--prompts", "prompts_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="One prompt per line, or JSONL with human/prompt fields.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL to append to; existing prompts in it are skipped (resume).")
@click.option("--teacher-url", default=None,
              help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1); default: the "
                   "local base model.")
@click.option("--teacher-model", default="gpt-4o-mini", show_default=True,
              help="Model name sent to --teacher-url.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the teacher's API key.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Generation option for the teacher.")
@engine_options
def data_distill(persona: str, prompts_file: Path, out: Path, teacher_url: str | None,
                 teacher_model: str, api_key_env: str, batch_size: int,
                 options: tuple[tuple[str, str], ...], base: str | None, dtype: str,
                 quantize: str | None) -> None:
    """Build a dataset by asking a teacher to answer prompts with PERSONA's full contract."""
    from tqdm import tqdm

    from hyperlex.distill import (
        LocalTeacher,
        OpenAITeacher,
        api_key_from,
        distill,
        pending,
        read_prompts,
    )
    from hyperlex.generation import parse_options

    host = get_host()
    chosen = host.persona(persona)
    params = chosen.contract.params().updated(parse_options(options), "-o")
    prompts = read_prompts(prompts_file)
    if teacher_url:
        teacher: Any = OpenAITeacher(teacher_url, teacher_model, api_key_from(api_key_env))
    else:
        from hyperlex.engine_torch import TorchEngine

        teacher = LocalTeacher(TorchEngine([], base=base, dtype=dtype, quantize=quantize))
    with tqdm(total=len(pending(prompts, out)), desc=f"distilling {persona}", unit="prompt",
              file=sys.stderr) as bar:
        stats = distill(prompts, chosen.system_message(), teacher, out, params, batch_size,
                        on_batch=bar.update)
    click.echo(f"{out}: {stats['written']} new records ({stats['skipped_existing']} prompts "
               f"already done, {stats['empty_replies']} empty replies dropped)", err=True)


@data.command("synth")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--direction", type=click.Choice(["output", "input", "both"]), default="output",
              show_default=True,
              help="output: scene -> text records; input: text -> scene records.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="Sample this many combinations (default: all).")
@click.option("--seed", default=0, show_default=True)
def data_synth(out: Path, direction: str, count: int | None, seed: int) -> None:
    """Write a synthetic scene <-> text corpus: scene templates x emotions x rhythms."""
    from hyperlex.data import write_records
    from hyperlex.synth import synth_records

    written = write_records(out, synth_records(count, direction, seed))
    click.echo(f"{out}: {written} records", err=True)


@cli.group(name="eval")
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


def _scene_options(func: Any) -> Any:
    """The round trip's scene set and encoder."""
    options = [
        click.option("--scenes", "scene_files", multiple=True, metavar="FILE",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Add the scenes of FILE (JSON lines: Scene.to_dict() plus an id; "
                          "repeatable)."),
        click.option("--no-shipped-scenes", is_flag=True,
                     help="Leave out the scenes shipped with hyperlex (use only --scenes)."),
        click.option("--encoder", default="default", show_default=True,
                     help="Scene encoder that reads the replies back."),
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
    from hyperlex.report import load_thresholds

    return load_thresholds(path)


def _finish(sections: list[Any], report_dir: Path | None, thresholds: Any,
            base: str | None = None) -> None:
    """Write the report if asked, then check the thresholds: exit 3 listing every metric
    that missed its threshold."""
    from hyperlex.report import GATE_EXIT, check, write_report

    failures = check(thresholds, sections)
    if report_dir is not None:
        ctx = click.get_current_context()
        options = {k: [str(x) for x in v] if isinstance(v, tuple) else
                   (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items()}
        meta = {"command": "agent " + " ".join(ctx.command_path.split()[1:]),
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
    from hyperlex.evaluate import evaluation_params, fidelity, load_sets

    sets = {name: load_sets(persona) for name, persona in chosen.items()}
    return fidelity(engine, chosen, {n: s[0][:limit] for n, s in sets.items()},
                    {n: s[1] for n, s in sets.items()},
                    params=evaluation_params(max_new_tokens),
                    batch_size=batch_size, progress=lambda m: click.echo(m, err=True))


def _fidelity_personas(host: Host, names: tuple[str, ...]) -> dict[str, Any]:
    chosen = {n: host.persona(n) for n in names} or _evaluable_personas(host)
    if len(chosen) < 2:
        raise HyperlexError("fidelity needs at least two personas with adapters and held-out "
                            f"sets; found: {', '.join(chosen) or 'none'}")
    return chosen


def _print_fidelity(report: Any) -> None:
    from hyperlex.evaluate import TARGETS

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
    from hyperlex.report import fidelity_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    _report_problems(host)
    chosen = _fidelity_personas(host, names)
    for persona in chosen.values():  # a missing data file fails before the model loads
        _check_sets(persona)
    engine = open_engine(host, base, dtype, quantize, only=list(chosen))
    report = _run_fidelity(host, chosen, engine, limit, max_new_tokens, batch_size)
    if as_json:
        _emit_json(report.as_dict())
    else:
        _print_fidelity(report)
    _finish([fidelity_section(report)], report_dir, thresholds, engine.base_name)


def _check_sets(persona: Any) -> None:
    from hyperlex.evaluate import load_sets

    load_sets(persona)


def _evaluable_personas(host: Host) -> dict[str, Any]:
    """Personas (not moods) with a trained adapter and the held-out set their train.yaml
    names."""
    from hyperlex.train import load_config

    return {n: p for n, p in host.personas.items()
            if not p.is_mood and p.adapter_dir is not None and p.root
            and (p.root / load_config(p.root).heldout).is_file()}


def _shipped_routing_cases() -> Path:
    from importlib import resources

    return Path(str(resources.files("hyperlex").joinpath("eval_data/routing.jsonl")))


def _run_routing(host: Host, cases: Any, router: str) -> Any:
    from hyperlex.route_eval import evaluate_routing
    from hyperlex.router import TurnRouter

    speakers = {n: p for n, p in host.personas.items() if not p.is_mood}
    return evaluate_routing(TurnRouter(host, speakers, None if router == "none" else router),
                            cases)


def _routing_cases(host: Host, path: Path) -> Any:
    from hyperlex.route_eval import load_cases

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
    from hyperlex.report import routing_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    _report_problems(host)
    cases = cases or _shipped_routing_cases()
    report = _run_routing(host, _routing_cases(host, cases), router)
    if as_json:
        _emit_json(report.as_dict())
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
    from hyperlex.roundtrip import load_scenes

    if no_shipped and not scene_files:
        raise click.UsageError("--no-shipped-scenes needs at least one --scenes FILE")
    return load_scenes(scene_files, shipped=not no_shipped)[:limit]


def _run_roundtrip(engine: Any, chosen: dict[str, Any], explicit: bool, scenes: Any,
                   encoder: Any, encoder_name: str, max_new_tokens: int,
                   batch_size: int) -> Any:
    from hyperlex.evaluate import evaluation_params
    from hyperlex.roundtrip import roundtrip

    skipped = [n for n in chosen if n in engine.skipped]
    if explicit and skipped:
        raise HyperlexError(engine.skipped[skipped[0]])
    speakers = {n: p for n, p in chosen.items() if n not in engine.skipped}
    if not speakers:
        raise HyperlexError("no persona left to evaluate: every adapter was skipped")
    return roundtrip(engine, speakers, scenes, encoder,
                     params=evaluation_params(max_new_tokens), batch_size=batch_size,
                     progress=lambda m: click.echo(m, err=True), encoder_name=encoder_name)


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
@engine_options
def eval_roundtrip(names: tuple[str, ...], scene_files: tuple[Path, ...],
                   no_shipped_scenes: bool, encoder: str, verbose: bool, limit: int | None,
                   max_new_tokens: int, batch_size: int, as_json: bool,
                   report_dir: Path | None, thresholds_file: Path | None, base: str | None,
                   dtype: str, quantize: str | None) -> None:
    """Scene -> text -> scene: each persona speaks every scene (its contract with the whole
    scene, greedy) and the encoder reads the reply back. Per persona: hyperlexeme recall and
    precision, link F1 (strict and relaxed), and the failure modes: split links,
    impoverished associations, logical loss (polarity flips)."""
    from hyperlex.report import roundtrip_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    _report_problems(host)
    scenes = _eval_scenes(scene_files, no_shipped_scenes, limit)
    reader = _scene_encoder(host, encoder)
    chosen = _roundtrip_personas(host, names)
    engine = open_engine(host, base, dtype, quantize, only=list(chosen))
    report = _run_roundtrip(engine, chosen, bool(names), scenes, reader, encoder,
                            max_new_tokens, batch_size)
    if as_json:
        _emit_json(report.as_dict())
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
def eval_all(names: tuple[str, ...], max_new_tokens: int, batch_size: int, limit: int | None,
             as_json: bool, base: str | None, dtype: str, quantize: str | None,
             cases: Path | None, router: str, scene_files: tuple[Path, ...],
             no_shipped_scenes: bool, encoder: str, verbose: bool, report_dir: Path | None,
             thresholds_file: Path | None) -> None:
    """Fidelity, routing and roundtrip in one run: one model load, one report and one gate.

    -p and --limit apply to fidelity (held-out prompts) and roundtrip (scenes)."""
    from hyperlex.report import fidelity_section, roundtrip_section, routing_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    _report_problems(host)
    chosen = _fidelity_personas(host, names)
    for persona in chosen.values():
        _check_sets(persona)
    cases = cases or _shipped_routing_cases()
    routing_cases = _routing_cases(host, cases)
    scenes = _eval_scenes(scene_files, no_shipped_scenes, limit)
    reader = _scene_encoder(host, encoder)
    click.echo("routing", err=True)
    routing_report = _run_routing(host, routing_cases, router)
    engine = open_engine(host, base, dtype, quantize, only=list(chosen))
    fidelity_report = _run_fidelity(host, chosen, engine, limit, max_new_tokens, batch_size)
    click.echo("round trip", err=True)
    roundtrip_report = _run_roundtrip(engine, chosen, True, scenes, reader, encoder,
                                      max_new_tokens, batch_size)
    if as_json:
        _emit_json({"fidelity": fidelity_report.as_dict(), "routing": routing_report.as_dict(),
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
    from hyperlex.embeddings import minilm_embedder
    from hyperlex.evaluate import evaluation_params, load_sets
    from hyperlex.mood_eval import mood_shift
    from hyperlex.report import mood_section

    thresholds = _load_gate(thresholds_file)
    host = get_host()
    _report_problems(host)
    installed = host.personas
    if mood not in installed or not installed[mood].is_mood:
        moods = [n for n, p in installed.items() if p.is_mood]
        raise click.BadParameter(str(UnknownPersona(mood, moods, kind="mood")),
                                 param_hint="'--mood'")
    if installed[mood].adapter_dir is None:
        raise HyperlexError(f"mood {mood!r} has no adapter to measure; train it with "
                            f"agent train {installed[mood].root}")
    candidates = _evaluable_personas(host)
    for name in names:
        if name not in candidates:
            raise click.BadParameter(f"{name!r} is not a persona with an adapter and held-out "
                                     f"data; choose from {', '.join(sorted(candidates))}",
                                     param_hint="'--persona'")
    chosen = {n: candidates[n] for n in names} or candidates
    sets = {name: load_sets(persona) for name, persona in candidates.items()}
    engine = open_engine(host, base, dtype, quantize, only=[*candidates, mood])
    report = mood_shift(
        engine, chosen, {n: sets[n][0][:limit] for n in chosen},
        {n: s[1] for n, s in sets.items()}, mood, weight, load_sets(installed[mood])[1],
        host.scene_encoders["default"], minilm_embedder(),
        params=evaluation_params(max_new_tokens),
        batch_size=batch_size, progress=lambda m: click.echo(m, err=True))
    if as_json:
        _emit_json(report.as_dict())
    else:
        click.echo(report.table())
    _finish([mood_section(report)], report_dir, thresholds, engine.base_name)


@cli.group()
def persona() -> None:
    """Create persona plugin packages."""


@persona.command("new")
@click.argument("name")
@click.option("--dir", "parent", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True,
              help="Where to create the package directory hyperlex-persona-NAME.")
@click.option("--description", default=None, help="One line: what the persona is.")
@click.option("--base", "base_model", default=None, metavar="MODEL",
              help="base_model of the bundle (default: the embedded model).")
def persona_new(name: str, parent: Path, description: str | None,
                base_model: str | None) -> None:
    """Scaffold a pip-installable plugin package for a new persona NAME: pyproject.toml with
    its hyperlex entry point, the bundle (persona.yaml, train.yaml, starter data), an example
    scene encoder and tests. See docs/writing-a-persona.md."""
    from hyperlex.models import EMBEDDED_NAME
    from hyperlex.scaffold import create, package_names

    root = create(name, parent, description, base_model or EMBEDDED_NAME)
    module = package_names(name)[1]
    click.echo(str(root))
    click.echo(f"""Next:
  1. write the persona: {root}/src/{module}/bundle/persona.yaml (contract, routing)
  2. author its data:   {root}/src/{module}/bundle/data/train.jsonl (and heldout.jsonl)
  3. install it:        pip install -e {root}
  4. train and check:   agent train {root}/src/{module}/bundle && agent eval fidelity -p {name}
  5. talk to it:        agent chat --persona {name}""", err=True)


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the performance benchmarks of a hyperlex checkout (the same as python -m bench;
    agent bench --help lists its options). See docs/performance.md."""
    root = _checkout_with_bench()
    if root is None:
        raise HyperlexError("agent bench runs the benchmarks in bench/ of a hyperlex source "
                            "checkout (they are not installed with the package); run it from "
                            "the repository root, or: python -m bench")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.__main__ import main as bench_main

    sys.exit(bench_main(list(args), prog="agent bench"))


def _checkout_with_bench() -> Path | None:
    """The working directory, or the checkout an editable install runs from, if it holds
    hyperlex's bench/ package."""
    import hyperlex

    for root in (Path.cwd(), Path(hyperlex.__file__).resolve().parent.parent):
        if (root / "bench" / "__main__.py").is_file() and (root / "bench" / "common.py").is_file():
            return root
    return None


def _add_command_groups() -> None:
    from hyperlex.cli_calibrate import calibrate
    from hyperlex.cli_export import export
    from hyperlex.cli_inspect import inspect
    from hyperlex.cli_scene import scene
    from hyperlex.cli_serve import serve
    from hyperlex.cli_sessions import sessions

    eval_group.add_command(calibrate)
    cli.add_command(export)
    cli.add_command(inspect)
    cli.add_command(serve)
    cli.add_command(scene)
    cli.add_command(sessions)


_add_command_groups()
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
