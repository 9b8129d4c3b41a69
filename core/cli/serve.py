"""``agent serve``: the personas behind an OpenAI-compatible API (see docs/serving.md)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import click

from hyperlex.cli.common import engine_options
from hyperlex.errors import HyperlexError
from hyperlex.serve.limits import Limits


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the personas to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any free port; the URL is printed).")
@click.option("--api-key", envvar="HYPERLEX_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every request "
              "[env: HYPERLEX_API_KEY].")
@click.option("--api-keys", "api_keys", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Tenants: lines 'KEY TENANT' or YAML 'tenant: key'; each tenant has its "
              "own conversations and sessions (docs/serving.md).")
@click.option("--timeout-keep-alive", default=Limits.keep_alive_s, show_default=True,
              type=click.FloatRange(min=1), metavar="S",
              help="Close a keep-alive connection idle this long.")
@click.option("--timeout-headers", default=Limits.header_s, show_default=True,
              type=click.FloatRange(min=0.1), metavar="S",
              help="A request's line and headers must arrive within this.")
@click.option("--timeout-body", default=Limits.body_s, show_default=True,
              type=click.FloatRange(min=0.1), metavar="S",
              help="A request's body must arrive within this (else 408).")
@click.option("--timeout-generation", default=Limits.generation_s, show_default=True,
              type=click.FloatRange(min=0.1), metavar="S",
              help="Stop a reply that takes longer (504; nothing saved).")
@click.option("--max-body-bytes", default=Limits.max_body_bytes, show_default=True,
              type=click.IntRange(1024), metavar="N", help="Largest request body (else 413).")
@click.option("--limit-concurrency", default=Limits.concurrency, show_default=True,
              type=click.IntRange(1), metavar="N",
              help="Chat requests in progress at once (beyond: 503).")
@click.option("--timeout-graceful", default=Limits.graceful_s, show_default=True,
              type=click.FloatRange(min=1), metavar="S",
              help="On Ctrl-C/SIGTERM, running turns get this long, then are cancelled.")
@click.option("--engine", "--backend", "backend",
              type=click.Choice(["auto", "torch", "llamacpp"]), default="auto",
              show_default=True,
              help="Inference engine; auto: llama.cpp when installed, else transformers + PEFT.")
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 64),
              help="llama.cpp: contexts, each running one persona (and mood) at a time; on "
              "the torch engine, the rows of one batch that waiting turns share.")
@click.option("--sequences", default=8, show_default=True, type=click.IntRange(1, 64),
              metavar="N", help="llama.cpp: turns of one persona each context decodes "
              "together (1: batching off; each takes a KV cache of ~47 MB).")
@click.option("--router", default="embedding", show_default=True,
              help="Automatic router for the 'auto' model ('none': keep the current persona).")
@click.option("--no-store", is_flag=True,
              help="Do not save conversations (requests with a conversation id are saved as "
              "sessions of that name by default).")
@click.option("-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Default generation option for every request, e.g. -o max_new_tokens 128.")
@click.option("--no-ui", is_flag=True,
              help="Do not serve the web page at / (the JSON API under /api stays).")
@click.option("--quiet", is_flag=True, help="Do not log each request to stderr.")
@engine_options
def serve(host: str, port: int, api_key: str | None, api_keys: Path | None,
          timeout_keep_alive: float, timeout_headers: float, timeout_body: float,
          timeout_generation: float, max_body_bytes: int, limit_concurrency: int,
          timeout_graceful: float, backend: str, parallel: int, sequences: int, router: str,
          no_store: bool, options: tuple[tuple[str, str], ...], no_ui: bool, quiet: bool,
          base: str | None,
          dtype: str, quantize: str | None) -> None:
    """Serve the personas over an OpenAI-compatible API.

    GET /v1/models lists 'auto' and every persona; POST /v1/chat/completions answers with
    the persona named by 'model' (or routes, for 'auto'), streaming with "stream": true. Send
    an X-Conversation-Id header (or the 'user' field) to keep the scene across requests.
    GET / is a web page with the chat, the routing, the scene graph and the field
    (docs/ui.md; --no-ui turns it off).
    Ctrl-C (or SIGTERM) stops the server: running turns get --timeout-graceful to finish.
    """
    from hyperlex.agent.router import check_router
    from hyperlex.agent.store import Store
    from hyperlex.cli.common import (
        check_option,
        choose_backend,
        get_host,
        open_engine,
        warm_up_encoders,
        warn,
    )
    from hyperlex.generation import parse_options
    from hyperlex.serve.http import Server
    from hyperlex.serve.server import PersonaService
    from hyperlex.serve.tenants import Keyring, load_keys

    if api_key and api_keys:
        raise click.UsageError("give --api-key or --api-keys, not both")
    keys = load_keys(api_keys) if api_keys else Keyring.single(api_key)
    limits = Limits(keep_alive_s=timeout_keep_alive, header_s=timeout_headers,
                    body_s=timeout_body, max_body_bytes=max_body_bytes,
                    concurrency=limit_concurrency, generation_s=timeout_generation,
                    graceful_s=timeout_graceful)
    app = get_host()
    overrides = parse_options(options)
    for line in app.failures:
        warn(line)
    check_option("--router", check_router, app, router)
    if not _loopback(host) and not keys.required:
        warn(f"serving on {host} without --api-key: anyone who can reach this machine can use "
             "the personas")
    chosen = choose_backend(backend, dtype, quantize, merge=False)
    warm_up_encoders(app)
    engine = open_engine(app, base, dtype, quantize, backend=chosen, parallel=parallel,
                         sequences=sequences)
    if not engine.personas:
        raise HyperlexError("no personas could be loaded (agent personas shows why)")
    store = None if no_store else Store()
    from hyperlex.cli.command_refs import CommandReferences
    from hyperlex.eval.fidelity import voice_scorer

    service = PersonaService(app, engine, router=None if router == "none" else router,
                             store=store, overrides=overrides,
                             voice=voice_scorer(engine.personas),
                             reply_problem=CommandReferences.of_this_cli(app.personas).problem)
    service.warm_up()
    try:
        server = Server(service, host, port, keys=keys, limits=limits, log=not quiet,
                        ui=not no_ui)
    except OSError as exc:
        raise HyperlexError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    names = ", ".join(service.speakers)
    tenants = len(keys.tenants)
    secured = "" if not keys.required else " (API key required)" if tenants == 1 and \
        not api_keys else f" ({tenants} tenants)"
    click.echo(f"Serving auto and {len(service.speakers)} personas ({names}) on {server.url}"
               f"{secured}; Ctrl-C stops", err=True)
    if not no_ui:
        click.echo(f"The web page: {server.url.removesuffix('/v1')}/", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        _close(engine, store)
    click.echo("Stopped.", err=True)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _close(engine: Any, store: Any) -> None:
    if hasattr(engine, "close"):
        engine.close()
    if store is not None:
        store.close()
