"""``agent sessions``: list, show, export and delete stored chat sessions.

Content goes to stdout, diagnostics and prompts to stderr. Only the standard library and click
are imported: no model is loaded.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from hyperlex.agent.store import DEFAULT_TENANT, EXPORT_FORMATS, Store, export_document
from hyperlex.errors import HyperlexError


class SessionsGroup(click.Group):
    """Turns user errors into one-line messages, also when the group runs on its own."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HyperlexError as exc:
            raise click.ClickException(str(exc)) from None


def _local(stamp: str) -> str:
    """A stored UTC timestamp as local 'YYYY-MM-DD HH:MM'."""
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _short(text: str, width: int = 72) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


@click.group(cls=SessionsGroup)
def sessions() -> None:
    """Stored chat sessions (resume one with agent chat --session NAME)."""


def _tenant_option(func: Any) -> Any:
    return click.option("--tenant", default=DEFAULT_TENANT, metavar="NAME",
                        help="The agent serve tenant the session belongs to (default: the "
                        "one of agent chat and a server with one --api-key).")(func)


@sessions.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the sessions as a JSON array.")
@click.option("--tenant", default=None, metavar="NAME",
              help="Only this agent serve tenant's sessions (default: every tenant's).")
def list_sessions(as_json: bool, tenant: str | None) -> None:
    """List sessions, most recently updated first."""
    with Store(tenant=tenant or DEFAULT_TENANT) as store:
        infos = store.sessions(all_tenants=tenant is None)
    if as_json:
        click.echo(json.dumps([info.as_dict() for info in infos], indent=2, ensure_ascii=False))
        return
    if not infos:
        click.echo("No sessions yet (agent chat --session NAME starts one).", err=True)
        return
    tenants = any(info.tenant != DEFAULT_TENANT for info in infos)
    rows = [["NAME", *(["TENANT"] * tenants), "TURNS", "LAST PERSONA", "UPDATED"]]
    rows += [
        [info.name, *([info.tenant or "-"] * tenants), str(info.turns),
         info.last_persona or "-", _local(info.updated_at)]
        for info in infos
    ]
    click.echo(_table(rows))


@sessions.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the session as JSON.")
@_tenant_option
def show_session(name: str, as_json: bool, tenant: str) -> None:
    """Show a session's turns: who answered and why."""
    with Store(tenant=tenant) as store:
        record = store.session(name)
    if as_json:
        click.echo(json.dumps(export_document(record), sort_keys=True, indent=2,
                              ensure_ascii=False))
        return
    info = record.info
    owner = f" (tenant {info.tenant})" if info.tenant else ""
    click.echo(f"Session {info.name}{owner}: {info.turns} turn{'s' * (info.turns != 1)}, "
               f"created {_local(info.created_at)}, updated {_local(info.updated_at)}")
    if info.persona:
        click.echo(f"pinned persona: {info.persona}")
    if info.mood:
        click.echo(f"mood: {info.mood}")
    for turn in record.turns:
        click.echo(f"\n#{turn['index']} {turn['persona']} ({turn['reason'] or 'no reason'})")
        click.echo(f"  you: {_short(turn['user'])}")
        click.echo(f"  {turn['persona']}: {_short(turn['reply'])}")
    scene = record.latest_scene()
    if scene is not None:
        from hyperlex.scene.display import scene_table
        from hyperlex.scene.model import Scene

        click.echo(f"\nscene (version {record.scene_version}):")
        click.echo(scene_table(Scene.from_json(scene)))


@sessions.command("export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="json",
              show_default=True, help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file instead of stdout.")
@_tenant_option
def export_session(name: str, fmt: str, output: Path | None, tenant: str) -> None:
    """Export a session with its turns and final scene."""
    with Store(tenant=tenant) as store:
        text = store.export(name, fmt)
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise HyperlexError(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(f"{output}: session {name} as {fmt}", err=True)


@sessions.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_tenant_option
def delete_session(name: str, yes: bool, tenant: str) -> None:
    """Delete a session with its turns and scenes."""
    with Store(tenant=tenant) as store:
        info = store.session(name).info
        if not yes:
            click.confirm(
                f"Delete session {name} ({info.turns} turn{'s' * (info.turns != 1)})?",
                abort=True,
                err=True,
            )
        store.delete_session(name)
    click.echo(f"Deleted session {name}.", err=True)
