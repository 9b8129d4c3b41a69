"""What every command module shares: the process-wide plugin host, the options of the
commands that load a model, opening an engine, and output helpers. Command modules
import from here, never from ``hyperlex.cli`` (only ``hyperlex.cli`` imports them)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.host import Host


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


_HOST: Host | None = None


def get_host() -> Host:
    """The process-wide plugin host, created on first use."""
    global _HOST
    if _HOST is None:
        _HOST = Host()
    return _HOST


def forget_host() -> None:
    global _HOST
    _HOST = None


def invocation(ctx: click.Context) -> str:
    """The command as the user gave it, for a report to name: ``agent``, the subcommand and
    every parameter that came from the command line or the environment (not the defaults),
    in the command's order, quoted for a shell."""
    import shlex

    from click.core import ParameterSource

    words = ["agent", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name or "")
        if source not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        value = ctx.params.get(param.name or "")
        if isinstance(param, click.Argument):
            words += [str(v) for v in (value if isinstance(value, tuple) else [value])]
        elif isinstance(param, click.Option) and param.is_flag:
            flag = param.opts if value or not param.secondary_opts else param.secondary_opts
            words.append(max(flag, key=len))
        else:
            for item in value if param.multiple else [value]:
                parts = item if isinstance(item, tuple) else (item,)
                words += [max(param.opts, key=len), *(str(part) for part in parts)]
    return shlex.join(words)


def warn(message: str) -> None:
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def report_problems(host: Host) -> None:
    for line in host.failures:
        warn(line)


def open_engine(host: Host, base: str | None, dtype: str, quantize: str | None,
                only: list[str] | None = None, merge: bool = False,
                backend: str = "torch", parallel: int = 1, sequences: int = 1,
                base_url: str | None = None, api_key: str | None = None,
                exact: bool = False) -> Any:
    """Load the base once and attach every installed persona's adapter (or ``only`` these);
    ``exact``: llama.cpp runs an F32 GGUF of the base's weights, whose greedy replies are
    the torch engine's token for token (for evaluations);
    ``backend`` "torch", "llamacpp" or "openai" (the server at ``base_url`` generates; see
    :func:`choose_backend`). ``parallel``: llama.cpp contexts (a composition each), or rows
    of one torch batch; ``sequences``: turns of one composition each llama.cpp context
    decodes together."""
    from hyperlex.engines import registry
    from hyperlex.engines.models import resolve_base

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
    options: dict[str, Any] = {
        "torch": {"dtype": dtype, "quantize": quantize, "merge": merge, "max_batch": parallel},
        "llamacpp": {"contexts": parallel, "sequences": sequences, "exact": exact},
        "openai": {"base_url": base_url, "api_key": api_key},
    }[backend]
    engine = registry.open_engine(personas, backend, resolved, **options)
    for reason in engine.skipped.values():
        warn(reason)
    return engine


def sample_capacity(backend: str, samples: int) -> dict[str, int]:
    """:func:`open_engine`'s ``parallel`` and ``sequences`` for ``samples`` replies of one
    turn (``--best-of``) to decode together: rows of one torch batch, or sequences of one
    llama.cpp context."""
    return {"parallel": samples if backend == "torch" else 1,
            "sequences": samples if backend == "llamacpp" else 1}


def check_option(option: str, check: Callable[..., Any], *args: Any) -> None:
    """Run the library's own ``check`` of an option's value; its error, with its message,
    becomes a usage error naming ``option``."""
    try:
        check(*args)
    except HyperlexError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{option}'") from None


def compositions(host: Host, specs: tuple[str, ...]) -> list[tuple[str, float]]:
    """The ``--compose LAYER[:WEIGHT]`` layers, each checked (a mood, or a persona with
    ``layer: true``), duplicates dropped; a bad one is a usage error naming the option."""
    from hyperlex.agent.moods import parse_mood

    layers = {n: p for n, p in host.personas.items() if p.is_layer}
    parsed: list[tuple[str, float]] = []
    for spec in specs:
        try:
            layer = parse_mood(layers, spec)
        except HyperlexError as exc:
            raise click.BadParameter(str(exc), param_hint="'--compose'") from None
        if layer is not None and layer not in parsed:
            parsed.append(layer)
    return parsed


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


GUIDANCE_HELP = ("Scene guidance (context-aware decoding): each next word is weighed by how "
                 "much the scene raises its likelihood, at this weight; 0: none. Torch "
                 "engine only; docs/verification.md, \"Scene guidance\".")


def guidance_option(func: Any = None, *, also: str = "") -> Any:
    """The ``--guidance`` option; ``also``: what it means for this command, after the help."""
    def decorate(command: Any) -> Any:
        return click.option("--guidance", type=click.FloatRange(min=0), default=0.0,
                            show_default=True, help=GUIDANCE_HELP + also)(command)
    return decorate if func is None else decorate(func)


def check_guidance(guidance: float, backend: str) -> None:
    if guidance and backend != "torch":
        raise click.UsageError(f"--guidance runs on the torch engine, not --engine {backend}")


def choose_backend(requested: str, dtype: str, quantize: str | None, merge: bool) -> str:
    """``auto``: llama.cpp when it is installed and no torch-only option was given."""
    from hyperlex.engines.registry import engine_entry

    available = engine_entry("llamacpp").available
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


def size_text(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def print_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


