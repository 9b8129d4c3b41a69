"""``agent personas`` and ``agent plugins``: what is installed, without loading a model."""

from __future__ import annotations

import click

from hyperlex.cli.common import (
    emit_json,
    get_host,
    print_table,
    report_problems,
    size_text,
)


@click.command()
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
                "layer": persona.is_layer,
                "adapter_bytes": info.size_bytes if info else None,
                "path": str(persona.root) if persona.root else None,
            }
        )
    report_problems(host)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("No personas installed.", err=True)
        return
    table = [
        (
            r["name"] + (" (mood)" if r["kind"] == "mood" else " (also a layer)" if r["layer"]
                         else ""),
            r["title"],
            r["base_model"],
            f"r={r['adapter_rank']}" if r["adapter_rank"] else "-",
            size_text(r["adapter_bytes"]),
            r["plugin"],
            r["description"],
        )
        for r in rows
    ]
    print_table(("NAME", "TITLE", "BASE", "RANK", "SIZE", "PLUGIN", "DESCRIPTION"), table)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List plugins, their versions, hooks and failures."""
    host = get_host()
    host.run_registrations()  # so that failures inside registration hooks show
    root = click.get_current_context().find_root().command
    getattr(root, "load_plugin_commands", lambda: None)()  # plugin commands register too
    records = sorted(host.plugins.values(), key=lambda r: (not r.builtin, r.name))
    if as_json:
        emit_json(
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
    print_table(
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


