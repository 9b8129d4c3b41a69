"""Persona bundles: ``persona.yaml`` + a PEFT LoRA adapter + optional data, and the prompt contract.

Everything here is plain Python and YAML (no torch), so listing personas is cheap. Every
validation error names the file, the field and the problem.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hyperlex.errors import HyperlexError
from hyperlex.generation import GenerationParams, InvalidParameter
from hyperlex.scene.model import Scene

BUNDLE_FILE = "persona.yaml"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
SCENE_VIEWS = ("all", "focus", "none")
KINDS = ("persona", "mood")
DEFAULT_SCENE_BUDGET = 160
MAX_SCALE = 2.0  # the largest adapter scale a bundle may set (see ``Persona.scale``)
TEMPLATE_SLOTS = ("scene", "field", "persona")
TOP_LEVEL_FIELDS = (
    "name",
    "kind",
    "layer",
    "title",
    "description",
    "base_model",
    "adapter",
    "scale",
    "contract",
    "scene_encoder",
    "routing",
)
CONTRACT_FIELDS = ("system", "style", "scene_view", "scene_budget", "generation")
ROUTING_FIELDS = ("keywords", "examples")


class BundleError(HyperlexError):
    """A persona bundle is invalid. The message reads ``FILE: FIELD: PROBLEM``."""

    def __init__(self, file: Path | str, field_name: str | None, problem: str):
        self.file = str(file)
        self.field = field_name
        self.problem = problem
        where = f"{self.file}: {field_name}" if field_name else self.file
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Contract:
    """The prompt contract: how the persona's system message is built each turn."""

    system: str
    style: tuple[str, ...] = ()
    scene_view: str = "focus"
    scene_budget: int = DEFAULT_SCENE_BUDGET
    generation: Mapping[str, Any] = field(default_factory=dict)

    def render(
        self,
        persona: Persona,
        scene: Scene | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> str:
        """The system message: the template with its slots filled, then the style rules.

        The scene shows what ``scene_view`` allows, its least salient parts dropped until it
        fits ``scene_budget`` tokens (counted with ``count_tokens``, or estimated)."""
        scene = scene or Scene()
        shown = scene.render(self.scene_view, max_tokens=self.scene_budget,
                             count_tokens=count_tokens)
        text = self.system.format(
            persona=persona.title,
            scene=shown or "(empty)",
            field=scene.field.render(),
        ).strip()
        if self.style:
            text += "\nStyle: " + " ".join(rule.rstrip(".") + "." for rule in self.style)
        return text

    def params(self, base: GenerationParams | None = None) -> GenerationParams:
        return (base or GenerationParams()).updated(self.generation)


@dataclass(frozen=True)
class AdapterInfo:
    """What ``adapter_config.json`` and the weights file say, read without torch."""

    rank: int | None
    alpha: float | None
    target_modules: tuple[str, ...]
    size_bytes: int


@dataclass(frozen=True)
class Persona:
    name: str
    title: str
    description: str
    base_model: str
    contract: Contract
    adapter_dir: Path | None = None
    kind: str = "persona"
    scene_encoder: str = "default"
    keywords: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    root: Path | None = None
    scale: float = 1.0  # the adapter's LoRA scaling is multiplied by this when it is attached
    layer: bool = False  # a speaking persona that can also be composed over another, as moods are

    @classmethod
    def from_dir(cls, path: str | Path) -> Persona:
        """Load and validate a bundle directory; raise :class:`BundleError` on any problem."""
        root = Path(path).resolve()
        return cls.from_mapping(read_bundle_yaml(root), root=root, file=root / BUNDLE_FILE)

    @classmethod
    def from_mapping(
        cls, data: Any, root: Path | None = None, file: Path | str = BUNDLE_FILE
    ) -> Persona:
        v = _Validator(file)
        data = v.mapping(data, None, TOP_LEVEL_FIELDS)
        name = v.string(data, "name", required=True)
        if not NAME_PATTERN.match(name):
            raise BundleError(
                file,
                "name",
                f"{name!r} must be lowercase letters, digits, '-' or"
                " '_', starting with a letter (at most 64 characters)",
            )
        kind = v.string(data, "kind") or "persona"
        if kind not in KINDS:
            raise BundleError(file, "kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
        contract_data = v.mapping(data.get("contract"), "contract", CONTRACT_FIELDS, required=True)
        routing = v.mapping(data.get("routing", {}), "routing", ROUTING_FIELDS)
        adapter_rel = v.string(data, "adapter")
        adapter_dir = None
        if adapter_rel is not None:
            if root is None:
                raise BundleError(file, "adapter", "an adapter path needs a bundle directory")
            adapter_dir = _adapter_dir(root, adapter_rel, file)
        return cls(
            name=name,
            title=v.string(data, "title") or name.replace("_", " ").title(),
            description=v.string(data, "description", required=True),
            base_model=v.string(data, "base_model", required=True),
            contract=_contract(v, contract_data),
            adapter_dir=adapter_dir,
            kind=kind,
            scene_encoder=v.string(data, "scene_encoder") or "default",
            keywords=v.strings(routing, "routing.keywords"),
            examples=v.strings(routing, "routing.examples"),
            root=root,
            scale=_scale(v, data.get("scale", 1.0)),
            layer=_flag(v, data, "layer"),
        )

    def adapter_info(self) -> AdapterInfo | None:
        if self.adapter_dir is None:
            return None
        config = json.loads((self.adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        modules = config.get("target_modules") or ()
        return AdapterInfo(
            rank=config.get("r"),
            alpha=config.get("lora_alpha"),
            target_modules=tuple(sorted(modules)) if not isinstance(modules, str) else (modules,),
            size_bytes=(self.adapter_dir / ADAPTER_WEIGHTS).stat().st_size,
        )

    @property
    def is_mood(self) -> bool:
        """A mood is a contextual layer composed over a persona, never a speaker itself."""
        return self.kind == "mood"

    @property
    def is_layer(self) -> bool:
        """Whether the bundle can be composed over a speaking persona at a weight: every
        mood, and a persona with ``layer: true`` (the scene-writer)."""
        return self.is_mood or self.layer

    def system_message(
        self, scene: Scene | None = None, count_tokens: Callable[[str], int] | None = None
    ) -> str:
        return self.contract.render(self, scene, count_tokens)


def read_bundle_yaml(root: Path) -> Any:
    """The parsed ``persona.yaml`` of a bundle, or a :class:`BundleError` saying why not."""
    file = root / BUNDLE_FILE
    if not root.is_dir():
        raise BundleError(root, None, "not a directory")
    if not file.is_file():
        raise BundleError(file, None, "missing; a persona bundle needs a persona.yaml")
    return read_yaml(file)


def read_yaml(file: Path) -> Any:
    """A parsed YAML file, or a :class:`BundleError` naming the file (and line) on failure."""
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise BundleError(file, None, f"{line}invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise BundleError(file, None, "not UTF-8 text") from None
    except OSError as exc:
        raise BundleError(file, None, f"cannot be read: {exc.strerror or exc}") from None


class _Validator:
    """Small helpers that turn a YAML mapping into checked values, naming the field on error."""

    def __init__(self, file: Path | str):
        self.file = file

    def fail(self, field_name: str | None, problem: str) -> BundleError:
        return BundleError(self.file, field_name, problem)

    def mapping(
        self, value: Any, name: str | None, allowed: tuple[str, ...], required: bool = False
    ) -> dict[str, Any]:
        where = name or "top level"
        if value is None:
            if required:
                raise self.fail(name, "required field is missing")
            return {}
        if not isinstance(value, dict):
            raise self.fail(name, f"{where} must be a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                prefix = f"{name}." if name else ""
                raise self.fail(
                    f"{prefix}{key}", f"unknown field; allowed fields: {', '.join(allowed)}"
                )
        return value

    def string(
        self, data: Mapping[str, Any], key: str, required: bool = False, name: str | None = None
    ) -> str | None:
        name = name or key
        value = data.get(key)
        if value is None:
            if required:
                raise self.fail(name, "required field is missing")
            return None
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise self.fail(name, "must not be empty")
        return value

    def strings(self, data: Mapping[str, Any], name: str) -> tuple[str, ...]:
        value = data.get(name.rsplit(".", 1)[-1])
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise self.fail(name, "must be a list of strings")
        return tuple(value)


def _contract(v: _Validator, data: dict[str, Any]) -> Contract:
    system = v.string(data, "system", required=True, name="contract.system")
    try:
        slots = [slot for _, slot, _, _ in string.Formatter().parse(system)]
    except ValueError as exc:  # a lone "{" or "}"
        raise v.fail("contract.system", f"{exc}; write {{{{ and }}}} for literal braces") from None
    for slot in slots:
        if slot is not None and slot not in TEMPLATE_SLOTS:
            raise v.fail(
                "contract.system",
                f"unknown slot {{{slot}}}; available slots: "
                + ", ".join("{" + s + "}" for s in TEMPLATE_SLOTS)
                + " (write {{ and }} for literal braces)",
            )
    scene_view = v.string(data, "scene_view", name="contract.scene_view") or "focus"
    if scene_view not in SCENE_VIEWS:
        raise v.fail(
            "contract.scene_view", f"must be one of {', '.join(SCENE_VIEWS)}, got {scene_view!r}"
        )
    budget = data.get("scene_budget", DEFAULT_SCENE_BUDGET)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise v.fail("contract.scene_budget", f"must be a positive whole number of tokens, "
                     f"got {budget!r}")
    generation = data.get("generation") or {}
    if not isinstance(generation, dict):
        raise v.fail("contract.generation", "must be a mapping of generation options")
    try:
        GenerationParams().updated(generation, where="contract.generation")
    except InvalidParameter as exc:
        raise v.fail(None, str(exc)) from None
    return Contract(
        system=system,
        style=v.strings(data, "contract.style"),
        scene_view=scene_view,
        scene_budget=budget,
        generation=dict(generation),
    )


def check_scale(value: Any) -> float:
    """``value`` as an adapter scale, or ``ValueError`` saying why it is not one: a number in
    (0, MAX_SCALE]."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not 0 < value <= MAX_SCALE:
        raise ValueError(f"must be a number in (0, {MAX_SCALE:g}], got {value!r}")
    return float(value)


def _flag(v: _Validator, data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise v.fail(name, f"must be true or false, got {value!r}")
    return value


def _scale(v: _Validator, value: Any) -> float:
    try:
        return check_scale(value)
    except ValueError as exc:
        raise v.fail("scale", str(exc)) from None


def _adapter_dir(root: Path, relative: str, file: Path | str) -> Path:
    if not relative.strip():
        raise BundleError(file, "adapter", "must not be empty; omit the field for a persona "
                                           "without an adapter")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise BundleError(file, "adapter", f"{relative!r} points outside the bundle directory")
    if not path.is_dir():
        raise BundleError(file, "adapter", f"adapter folder {relative!r} does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        raise BundleError(
            path / ADAPTER_CONFIG, None, "missing; the adapter must be in PEFT format"
        )
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise BundleError(
                path,
                None,
                f"refusing pickle adapter weights ({', '.join(pickles)});"
                f" only {ADAPTER_WEIGHTS} is loaded. Convert it with "
                "safetensors.torch.save_file",
            )
        raise BundleError(weights, None, "missing; adapters are loaded from safetensors only")
    for member in (weights, path / ADAPTER_CONFIG):
        if not member.resolve().is_relative_to(root):
            raise BundleError(member, None, "symlink points outside the bundle directory")
    _check_adapter_config(path / ADAPTER_CONFIG)
    return path


def _check_adapter_config(file: Path) -> None:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(file, None, f"invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise BundleError(file, None, "must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise BundleError(
            file, "peft_type", f"only LORA adapters are supported, got {config.get('peft_type')!r}"
        )
    if config.get("use_dora"):
        raise BundleError(
            file,
            "use_dora",
            "DoRA adapters are not supported (adapters must stay portable to llama.cpp and vLLM)",
        )
    if config.get("modules_to_save"):
        raise BundleError(
            file,
            "modules_to_save",
            "full-module copies are not supported; train a plain LoRA adapter",
        )
    if config.get("bias", "none") != "none":
        raise BundleError(file, "bias", f"LoRA bias is not supported, got {config['bias']!r}; "
                                        "train with bias='none'")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise BundleError(file, "r", f"must be a positive integer, got {rank!r}")
