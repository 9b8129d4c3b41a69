"""A reply that names an agent command, option or persona that does not exist is caught."""

from __future__ import annotations

import pytest

from hyperlex.cli import cli
from hyperlex.cli.command_refs import CommandReferences

PERSONAS = ("philosopher", "poet", "writer")


@pytest.fixture
def refs() -> CommandReferences:
    return CommandReferences(cli, PERSONAS)


@pytest.mark.parametrize("reply", [
    "Try `agent chat -p philosopher` to ask why.",
    "Run `agent train` on the bundle.",  # named without its required argument
    "Add `agent chat -m` and your question.",  # an option named without its value
    "`agent eval negation -p poet --best-of 4 --json` counts them.",
    "`agent chat --persona=poet --mood writer:0.5`",
    "`agent --version`",
    "`agent sessions show walk`",
    "Type `/personas` in the chat.",  # not an agent command line
    "No command here at all.",
])
def test_commands_that_exist_pass(refs: CommandReferences, reply: str) -> None:
    assert refs.problem(reply) is None


@pytest.mark.parametrize(("reply", "named"), [
    ("Try `agent chat -p postman` and see.", "no persona 'postman'"),
    ("`agent eval fidelity -p poet -p bob`", "no persona 'bob'"),
    ("Check with `agent data/persona_list`.", "no command 'agent data/persona_list'"),
    ("`agent data shuffle`", "no command 'agent data shuffle'"),
    ("`agent chat --colour red`", "No such option '--colour'"),
])
def test_a_command_that_does_not_exist_is_named_with_what_is_wrong(
        refs: CommandReferences, reply: str, named: str) -> None:
    problem = refs.problem(reply)
    assert problem is not None and named in problem
    assert problem.startswith("`agent ")


def test_the_first_wrong_command_of_several_is_named(refs: CommandReferences) -> None:
    reply = "Use `agent personas`, then `agent chat -p chef`, then `agent chat -p cook`."
    assert refs.problem(reply) == "`agent chat -p chef`: no persona 'chef'"


def test_the_shipped_self_distilled_records_name_only_commands_that_exist() -> None:
    """Every persona's committed agent data faithful records pass the check the command
    applies (those written before it, and any a round keeps by hand)."""
    import json
    from pathlib import Path

    from hyperlex.persona.bundle import Persona

    shipped = Path(__file__).parent.parent / "personas"
    refs = CommandReferences(cli, [Persona.from_dir(yaml.parent).name
                                   for yaml in shipped.glob("*/persona.yaml")])
    files = sorted(shipped.glob("*/data/faithful*.jsonl"))
    assert files
    wrong = [(f"{path.parent.parent.name}/{path.name}:{number}", problem)
             for path in files
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if (problem := refs.problem(json.loads(line)["text"]))]
    assert wrong == []
