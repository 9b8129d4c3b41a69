"""``agent persona new`` and ``agent bench``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hyperlex.errors import HyperlexError


@click.group()
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
    from hyperlex.engines.models import EMBEDDED_NAME
    from hyperlex.persona.scaffold import create, package_names

    root = create(name, parent, base_model or EMBEDDED_NAME, description)
    module = package_names(name)[1]
    click.echo(str(root))
    click.echo(f"""Next:
  1. write the persona: {root}/src/{module}/bundle/persona.yaml (contract, routing)
  2. author its data:   {root}/src/{module}/bundle/data/train.jsonl (and heldout.jsonl)
  3. install it:        pip install -e {root}
  4. train and check:   agent train {root}/src/{module}/bundle && agent eval fidelity -p {name}
  5. talk to it:        agent chat --persona {name}""", err=True)


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
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


