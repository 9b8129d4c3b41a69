"""Human views of a scene for terminals: a table of hyperlexemes, or a tree of their links."""

from __future__ import annotations

from hyperlex.scene.model import Link, Scene, provenance


def scene_table(scene: Scene) -> str:
    """One row per hyperlexeme (the user's facts first, then by salience; * marks the focus)
    with who said it, then the links (a persona's marked ``(by NAME)``) and the field."""
    if scene.empty:
        return f"(empty scene, version {scene.version})\nfield: {scene.field.render()}"
    rows = [("", "LABEL", "KIND", "SALIENCE", "ATTRS", "SAID BY")]
    rows += [("*" if focus else "", label, kind, f"{salience:.2f}", attrs, said)
             for label, kind, salience, attrs, focus, said in scene.table_rows()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    if scene.links:
        lines += ["", "links:"] + [f"  {_link_text(scene, i)}" for i in range(len(scene.links))]
    lines += ["", f"field: {scene.field.render()}", f"version {scene.version}"]
    return "\n".join(lines)


def scene_tree(scene: Scene) -> str:
    """Each hyperlexeme with the links that leave it, indented beneath it."""
    if scene.empty:
        return f"(empty scene, version {scene.version})"
    lines = []
    for hid in scene.ranked():
        hx = scene.hyperlexemes[hid]
        mark = " *" if hid in scene.focus else ""
        said = provenance(hx.said_by, hx.source_turn)
        lines.append(f"{hx.label} ({hx.kind}, {hx.salience:.2f}{', ' + said if said else ''})"
                     f"{mark}")
        outgoing = [link for link in scene.links if link.src == hid]
        for n, link in enumerate(outgoing):
            branch = "└─" if n == len(outgoing) - 1 else "├─"
            neg = "NOT " if link.polarity < 0 else ""
            lines.append(f"  {branch} {neg}{link.rel} → {scene.hyperlexemes[link.dst].label}"
                         f"{_said(link)}")
    lines.append(f"field: {scene.field.render()}")
    return "\n".join(lines)


def _link_text(scene: Scene, index: int) -> str:
    link = scene.links[index]
    neg = "NOT " if link.polarity < 0 else ""
    src, dst = scene.hyperlexemes[link.src].label, scene.hyperlexemes[link.dst].label
    return f"{src} {neg}{link.rel} {dst}{_said(link)}"


def _said(link: Link) -> str:
    """`` (said by user@2)``: who asserted the link, when recorded."""
    said = provenance([link.said_by] if link.said_by else [], link.turn)
    return f" (said by {said})" if said else ""
