"""``agent persona new NAME``: a pip-installable persona plugin package to start from.

The package registers its bundle through ``register_personas`` and an example scene encoder
through ``register_scene_encoders``, both found through the ``hyperlex`` entry point. The
bundle starts prompt-only; ``agent train`` adds the adapter (docs/writing-a-persona.md).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from hyperlex.errors import HyperlexError
from hyperlex.persona.bundle import NAME_PATTERN


def package_names(name: str) -> tuple[str, str]:
    """(distribution name, import package) for persona ``name``."""
    return f"hyperlex-persona-{name}", f"hyperlex_persona_{name.replace('-', '_')}"


def check_new_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise HyperlexError(
            f"invalid persona name {name!r}: use 1-64 lowercase letters, digits, '-' or '_', "
            "starting with a letter (e.g. stoic, sea-captain)")
    if name in ("default", "auto"):
        raise HyperlexError(f"invalid persona name {name!r}: it is reserved")


def create(name: str, parent: Path, base_model: str, description: str | None = None) -> Path:
    """Write the package for persona ``name`` under ``parent``; return its directory. Refuses
    an invalid name or an existing directory, writing nothing."""
    check_new_name(name)
    dist, module = package_names(name)
    root = parent / dist
    if root.exists():
        raise HyperlexError(f"{root} already exists; choose another directory (--dir) or "
                            "remove it")
    description = description or f"The {name} persona."
    files = _files(name, dist, module, description, base_model)
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _files(name: str, dist: str, module: str, description: str,
           base_model: str) -> dict[str, str]:
    title = name.replace("-", " ").replace("_", " ").title()
    bundle = f"src/{module}/bundle"
    encoder = f"{name}-scene"
    return {
        "pyproject.toml": _dedent(f"""\
            [build-system]
            requires = ["setuptools>=77"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "0.1.0"
            description = {json.dumps(description)}
            requires-python = ">=3.10"
            dependencies = ["hyperlex"]

            [project.optional-dependencies]
            test = ["pytest>=8.0"]

            # hyperlex finds the plugin through this entry point
            [project.entry-points.hyperlex]
            {name} = "{module}"

            [tool.setuptools.packages.find]
            where = ["src"]

            [tool.pytest.ini_options]
            testpaths = ["tests"]

            [tool.ruff]
            line-length = 100

            [tool.ruff.lint]
            select = ["E", "F", "I", "B", "UP"]

            [tool.setuptools.package-data]
            {module} = ["bundle/*.yaml", "bundle/data/*.jsonl", "bundle/adapter/*"]
            """),
        "README.md": _dedent(f"""\
            # {dist}

            The **{name}** persona for [hyperlex](https://pypi.org/project/hyperlex/): a
            persona bundle (prompt contract, training data, LoRA adapter once trained) and a
            scene encoder, registered through hyperlex's plugin hooks.

            ```bash
            pip install -e .                          # hyperlex finds it through its entry point
            agent personas                            # lists {name}, from plugin {name}
            agent train src/{module}/bundle           # trains the adapter (writes bundle/adapter/)
            agent eval fidelity -p {name}             # does the adapter hold the voice?
            agent chat --persona {name}
            pytest tests                              # the package's own checks
            ```
            """),
        f"src/{module}/__init__.py": _dedent(f'''\
            """The {name} persona as a hyperlex plugin: its bundle and its scene encoder."""

            from pathlib import Path

            from hyperlex import hookimpl

            from {module}.encoder import SceneEncoder

            BUNDLE = Path(__file__).parent / "bundle"


            @hookimpl
            def register_personas(register):
                register(BUNDLE)


            @hookimpl
            def register_scene_encoders(register):
                register("{encoder}", SceneEncoder())
            '''),
        f"src/{module}/encoder.py": _dedent(f'''\
            """The {name} persona's scene encoder: hyperlex's default encoder, plus what this
            persona notices. Here: each hyperlexeme whose label is in NOTICED gets the
            attribute ``noticed_by: {name}``; change it to what your persona cares about."""

            from hyperlex import DefaultEncoder, Delta

            NOTICED = frozenset({{"question", "time", "truth"}})


            class SceneEncoder:
                def __init__(self):
                    self._default = DefaultEncoder()

                def warm_up(self):
                    self._default.warm_up()

                def __call__(self, text: str) -> Delta:
                    delta = self._default(text)
                    for item in delta.hyperlexemes:
                        if item.label.lower() in NOTICED:
                            item.attrs["noticed_by"] = "{name}"
                    return delta
            '''),
        f"{bundle}/persona.yaml": _dedent(f"""\
            name: {name}
            title: The {title}
            description: {json.dumps(description)}
            base_model: {base_model}
            contract:
              system: |
                You are {{persona}}. Describe here, in a few sentences, how {name} answers
                every message.
                Scene: {{scene}}
              style:
                - One paragraph
              scene_view: focus
              generation:
                temperature: 0.7
                top_p: 0.9
                max_new_tokens: 200
                repetition_penalty: 1.1
            scene_encoder: {encoder}
            routing:
              keywords: [{name}]
              examples:
                - A message that clearly calls for {name}
                - Another one
            """),
        f"{bundle}/train.yaml": _dedent("""\
            # Options of `agent train` (docs/personas.md#trainyaml); the command line overrides.
            r: 6
            alpha: 12
            epochs: 3
            batch_size: 8
            save_dtype: bfloat16
            """),
        f"{bundle}/data/train.jsonl": "\n".join([
            '{"human": "What is time?", "text": "Replace this with how ' + name
            + ' would answer. Aim for 60 or more varied exchanges."}',
            '{"human": "How do I boil an egg?", "text": "Practical questions too, in ' + name
            + '\'s voice, still giving the practical gist."}',
        ]) + "\n",
        f"{bundle}/data/heldout.jsonl":
            '{"human": "Who are you?", "text": "A held-out exchange, never trained on."}\n',
        f"tests/test_{name.replace('-', '_')}.py": _dedent(f'''\
            """The package's own checks: the bundle is valid, hyperlex finds it through the
            entry point, and the persona answers on the base model."""

            from hyperlex import GenerationParams, Host, Persona, build_prompt, open_engine

            from {module} import BUNDLE


            def test_the_bundle_is_valid():
                persona = Persona.from_dir(BUNDLE)
                assert persona.name == "{name}"
                assert persona.scene_encoder == "{encoder}"


            def test_hyperlex_finds_the_persona_and_its_encoder_through_the_entry_point():
                host = Host()
                assert host.persona_registrations["{name}"].plugin == "{name}"
                assert "{encoder}" in host.scene_encoders


            def test_the_persona_answers():
                persona = Persona.from_dir(BUNDLE)
                engine = open_engine([persona], progress=False)
                messages = build_prompt(persona, "Hello, who are you?")
                reply = engine.generate(messages, "{name}",
                                        GenerationParams(temperature=0, max_new_tokens=24))
                assert reply.text.strip()
            '''),
    }


def _dedent(text: str) -> str:
    return textwrap.dedent(text)
