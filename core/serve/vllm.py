"""Export installed personas as a folder vLLM serves: one plain PEFT LoRA folder per persona,
plus the ``vllm serve`` command line that hosts them all on one base model.

vLLM serves LoRA adapters with ``vllm serve BASE --enable-lora --lora-modules name=path ...``;
a request picks a persona with its ``model`` field. Only what vLLM can serve is exported, and
everything is checked before anything is written. Adapter weights are copied byte for byte;
only ``base_model_name_or_path`` (and, for a persona with a ``scale``, ``lora_alpha``) changes
in the config. Nothing here imports torch: weights are never loaded, only their safetensors
header is read (pickle files are never opened).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperlex.engines.models import EMBEDDED_HUB_ID, ResolvedBase, ensure_embedded, resolve_base
from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.persona.bundle import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLE_SUFFIXES, Persona

MANIFEST = "hyperlex-vllm.json"
BASE_FOLDER = "base"
# The values vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOOD_REASON = "a mood composes over a persona at a weight; vLLM applies one adapter per request"
PROMPT_ONLY_NOTE = "served by the base model"
# Base model files --with-base copies: configs, tokenizer and safetensors weights, never pickle.
BASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
)
# adapter_config.json fields that must be empty/false for vLLM, and why.
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA adapters cannot be served by vLLM",
    "modules_to_save": "full-module copies cannot be served by vLLM; train a plain LoRA adapter",
    "rank_pattern": "per-module ranks cannot be served by vLLM (one r per adapter)",
    "alpha_pattern": "per-module alphas cannot be served by vLLM (one lora_alpha per adapter)",
    "lora_bias": "LoRA bias terms cannot be served by vLLM",
    "trainable_token_indices": "trained token embeddings cannot be served by vLLM",
    "target_parameters": "LoRA on raw parameters cannot be served by vLLM",
    "layer_replication": "layer replication cannot be served by vLLM",
    "alora_invocation_tokens": "activated LoRA (aLoRA) cannot be served by vLLM",
}
_TENSOR = re.compile(r"\.(?P<module>[A-Za-z0-9_]+)\.lora_[AB]\.weight$")


class AdapterRefused(HyperlexError):
    """A persona's adapter cannot be served by vLLM. The message names persona and field."""

    def __init__(self, persona: str, field_name: str, problem: str):
        self.persona = persona
        self.field = field_name
        self.problem = problem
        super().__init__(f"persona {persona!r}: {field_name}: {problem}")


@dataclass(frozen=True)
class ExportedAdapter:
    name: str
    path: Path  # DIR/<name>, absolute
    source: Path  # the bundle's adapter folder
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    config: dict[str, Any]  # the adapter_config.json written (base rewritten)


@dataclass
class VllmExport:
    """What was (or will be) written, and the command that serves it."""

    directory: Path
    base: str  # the base as vLLM loads it: a hub id or a path
    served_base_name: str
    adapters: dict[str, ExportedAdapter] = field(default_factory=dict)
    prompt_only: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    base_source: Path | None = None  # the directory --with-base copies

    @property
    def max_lora_rank(self) -> int:
        return lora_rank_flag(max(a.rank for a in self.adapters.values()))

    @property
    def max_loras(self) -> int:
        """Every adapter at once, so one batch may mix all personas."""
        return len(self.adapters)

    def _relative(self, path: str | Path) -> str:
        """``path`` as seen from inside the export directory, so the folder can be copied to
        the serving machine as it is (the command runs there from inside it)."""
        return f"./{Path(path).relative_to(self.directory).as_posix()}"

    @property
    def command(self) -> list[str]:
        """``vllm serve ...``, run from inside the export directory."""
        modules = [f"{name}={self._relative(a.path)}" for name, a in self.adapters.items()]
        base = self._relative(self.base) if self.base_source is not None else self.base
        return [
            "vllm", "serve", base,
            "--served-model-name", self.served_base_name,
            "--enable-lora",
            "--lora-modules", *modules,
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras),
        ]

    def shell_command(self) -> str:
        """``cd DIR && vllm serve ...`` as a bash line, split one flag per line for reading."""
        argv = self.command
        flags = [i for i, arg in enumerate(argv) if arg.startswith("--")]
        parts = [shlex.join(argv[a:b]) for a, b in zip([0, *flags], [*flags, len(argv)],
                                                          strict=True)]
        return f"cd {shlex.quote(str(self.directory))} && " + " \\\n  ".join(parts)

    def manifest(self) -> dict[str, Any]:
        return {
            "base": self.command[2],
            "served_base_name": self.served_base_name,
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            "personas": {
                name: {
                    "path": self._relative(a.path),
                    "r": a.rank,
                    "lora_alpha": a.alpha,
                    "target_modules": list(a.target_modules),
                }
                for name, a in self.adapters.items()
            },
            "prompt_only": list(self.prompt_only),
            "skipped": dict(self.skipped),
            "command": self.command,  # paths relative to the export directory: run it there
        }


def lora_rank_flag(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise HyperlexError(f"rank {rank} is above vLLM's largest --max-lora-rank "
                        f"({VLLM_LORA_RANKS[-1]})")


def export_vllm(
    directory: str | Path,
    personas: Iterable[Persona],
    base: str | None = None,
    names: Sequence[str] = (),
    with_base: bool = False,
    force: bool = False,
    warn: Callable[[str], None] | None = None,
) -> VllmExport:
    """Check every chosen persona, then write ``directory``.

    ``names`` chooses personas (all installed ones when empty). A persona vLLM cannot serve is
    skipped with ``warn`` and listed in the manifest, unless it was named in ``names`` or
    nothing would remain; then :class:`HyperlexError` is raised and nothing is written.
    """
    warn = warn or (lambda message: None)
    resolved = resolve_base(base)
    installed = {p.name: p for p in personas}
    chosen = _choose(installed, names)
    explicit = set(names)
    target = Path(directory).expanduser().resolve()
    export = VllmExport(
        directory=target,
        base=_served_base(resolved, target, with_base),
        served_base_name=resolved.name,
    )
    for persona in chosen:
        if persona.is_mood:
            if persona.name in explicit:
                raise HyperlexError(f"persona {persona.name!r} is a mood and cannot be exported:"
                                    f" {MOOD_REASON}")
            export.skipped[persona.name] = MOOD_REASON
            continue
        if persona.adapter_dir is None:
            export.prompt_only.append(persona.name)
            continue
        try:
            export.adapters[persona.name] = check_adapter(persona, resolved, export.base,
                                                          _inside(target, persona.name))
        except AdapterRefused as exc:
            if persona.name in explicit:
                raise
            export.skipped[persona.name] = f"{exc.field}: {exc.problem}"
            warn(f"skipping {exc}")
    if not export.adapters:
        why = "; ".join(f"persona {name!r}: {reason}" for name, reason in export.skipped.items())
        raise HyperlexError("no persona adapter to export" + (f": {why}" if why else ""))
    if export.served_base_name in export.adapters:
        raise HyperlexError(f"persona {export.served_base_name!r} has the base model's served "
                            "name; vLLM could not tell them apart")
    if with_base and BASE_FOLDER in export.adapters:
        raise HyperlexError(f"persona {BASE_FOLDER!r} would collide with the base folder "
                            "--with-base writes")
    if with_base:
        export.base_source = _base_source(resolved)
    _check_target(export, force)
    _write(export)
    return export


def _choose(installed: dict[str, Persona], names: Sequence[str]) -> list[Persona]:
    if not names:
        return [installed[name] for name in sorted(installed)]
    chosen: list[Persona] = []
    for name in dict.fromkeys(names):
        if name not in installed:
            raise UnknownPersona(name, list(installed))
        chosen.append(installed[name])
    return chosen


def _served_base(base: ResolvedBase, target: Path, with_base: bool) -> str:
    """The base as vLLM will load it."""
    if with_base:
        return str(target / BASE_FOLDER)
    if base.kind == "embedded":
        return EMBEDDED_HUB_ID
    return base.source


def check_adapter(persona: Persona, base: ResolvedBase, served_base: str,
                  folder: Path) -> ExportedAdapter:
    """Check that vLLM can serve ``persona``'s adapter on ``base``; raise
    :class:`AdapterRefused` naming the field otherwise. Reads the config and the safetensors
    header only."""
    name = persona.name
    assert persona.adapter_dir is not None
    source = persona.adapter_dir
    if persona.base_model.lower() != base.name:
        raise AdapterRefused(name, "base_model", f"trained on {persona.base_model!r}, but the "
                             f"export's base is {base.name!r} (choose the base with --base)")
    weights = source / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES) \
            if source.is_dir() else []
        if pickles:
            raise AdapterRefused(name, ADAPTER_WEIGHTS, f"missing; refusing pickle-only weights "
                                 f"({', '.join(pickles)}); convert them to safetensors")
        raise AdapterRefused(name, ADAPTER_WEIGHTS, f"missing in {source}")
    config = _read_config(name, source / ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise AdapterRefused(name, "peft_type",
                             f"only LORA adapters can be served, got {config.get('peft_type')!r}")
    if config.get("bias", "none") != "none":
        raise AdapterRefused(name, "bias", f"must be 'none' for vLLM, got {config['bias']!r}")
    for key, why in UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise AdapterRefused(name, key, f"{why} (got {config[key]!r})")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterRefused(name, "r", f"must be a positive integer, got {rank!r}")
    if rank > VLLM_LORA_RANKS[-1]:
        raise AdapterRefused(name, "r", f"{rank} is above vLLM's largest --max-lora-rank "
                             f"({VLLM_LORA_RANKS[-1]})")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterRefused(name, "lora_alpha", f"must be a positive number, got {alpha!r}")
    modules = config.get("target_modules")
    if not isinstance(modules, list) or not modules \
            or not all(isinstance(m, str) for m in modules):
        raise AdapterRefused(name, "target_modules", "must be a non-empty list of module "
                             f"names ({', '.join(LLAMA_PROJECTIONS)}), got {modules!r}")
    odd = sorted(set(modules) - set(LLAMA_PROJECTIONS))
    if odd:
        raise AdapterRefused(name, "target_modules", f"{', '.join(odd)} outside the standard "
                             f"projections vLLM serves ({', '.join(LLAMA_PROJECTIONS)})")
    _check_tensors(name, weights)
    written = dict(config)
    written["base_model_name_or_path"] = served_base
    if persona.scale != 1.0:
        # vLLM has no per-adapter scale; fold it into alpha (scaling = alpha / r, or
        # alpha / sqrt(r) with rsLoRA), so the persona speaks exactly as it does in hyperlex.
        scaled = alpha * persona.scale
        alpha = int(scaled) if float(scaled).is_integer() else scaled
        written["lora_alpha"] = alpha
    return ExportedAdapter(
        name=name,
        path=folder,
        source=source,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(m for m in LLAMA_PROJECTIONS if m in modules),
        config=written,
    )


def _read_config(name: str, file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterRefused(name, ADAPTER_CONFIG, f"missing in {file.parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRefused(name, ADAPTER_CONFIG, f"unreadable: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterRefused(name, ADAPTER_CONFIG, "must be a JSON object")
    return config


def _check_tensors(name: str, weights: Path) -> None:
    """Every tensor must be a LoRA A or B matrix of a standard projection: anything else (an
    embedding, a saved full module) would be ignored or rejected by vLLM."""
    try:
        with weights.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise AdapterRefused(name, ADAPTER_WEIGHTS, f"not a safetensors file ({exc})") from None
    tensors = [key for key in header if key != "__metadata__"]
    if not tensors:
        raise AdapterRefused(name, ADAPTER_WEIGHTS, "holds no tensors")
    for key in tensors:
        match = _TENSOR.search(key)
        if not match or match["module"] not in LLAMA_PROJECTIONS:
            raise AdapterRefused(name, ADAPTER_WEIGHTS, f"tensor {key!r} is not a LoRA A/B "
                                 "matrix of a standard projection")


def _base_source(base: ResolvedBase) -> Path:
    if base.kind == "embedded":
        return ensure_embedded()
    if base.kind == "local":
        return Path(base.source)
    raise HyperlexError(f"--with-base needs the base on this machine; {base.source!r} is a hub "
                        "id (download it, e.g. huggingface-cli download "
                        f"{base.source} --local-dir DIR, and pass --base DIR)")


def _base_files(source: Path) -> list[Path]:
    files = [source / name for name in BASE_FILES if (source / name).is_file()]
    files += sorted(p for p in source.glob("*.safetensors") if p.is_file())
    if not (source / "config.json").is_file():
        raise HyperlexError(f"base {source}: no config.json")
    if not any(p.suffix == ".safetensors" for p in files):
        pickles = sorted(p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (refusing pickle weights: {', '.join(pickles)})" if pickles else ""
        raise HyperlexError(f"base {source}: no safetensors weights{hint}")
    return files


def _inside(target: Path, name: str) -> Path:
    """``target / name``, refusing any name that could lead outside ``target``. The path is
    not resolved: an existing symlink there is replaced, never written through."""
    path = target / name
    if name in ("", ".", "..") or path.parent != target or Path(name).name != name:
        raise HyperlexError(f"{name!r} would be written outside {target}")
    return path


def _outputs(export: VllmExport) -> list[Path]:
    """Every path the export writes directly inside its directory."""
    names = [*export.adapters, MANIFEST]
    if export.base_source is not None:
        names.append(BASE_FOLDER)
    return [_inside(export.directory, name) for name in names]


def _check_target(export: VllmExport, force: bool) -> None:
    target = export.directory
    if target.exists() and not target.is_dir():
        raise HyperlexError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise HyperlexError(f"{target} is not empty; pass --force to replace the persona "
                            f"folders, {MANIFEST}" + (f" and {BASE_FOLDER}/"
                                                      if export.base_source else "")
                            + " the export writes there")
    sources = [a.source.resolve() for a in export.adapters.values()]
    if export.base_source is not None:
        sources.append(export.base_source.resolve())
    for output in _outputs(export):
        for source in sources:
            if source.is_relative_to(output):
                raise HyperlexError(f"exporting would overwrite {output}, which holds the "
                                    f"source {source}; choose another directory")


def _write(export: VllmExport) -> None:
    """Write everything into a staging folder inside the directory, then move each output into
    place, so a failure half way leaves the previous files untouched."""
    target = export.directory
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".hyperlex-export-", dir=target))
    except OSError as exc:
        raise HyperlexError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        for name, adapter in export.adapters.items():
            folder = staging / name
            folder.mkdir()
            shutil.copyfile(adapter.source / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
            (folder / ADAPTER_CONFIG).write_text(
                json.dumps(adapter.config, indent=2) + "\n", encoding="utf-8")
        if export.base_source is not None:
            _copy_base(export.base_source, staging / BASE_FOLDER)
        (staging / MANIFEST).write_text(
            json.dumps(export.manifest(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for output in _outputs(export):
            if output.is_symlink() or output.is_file():
                output.unlink()
            elif output.is_dir():
                shutil.rmtree(output)
            os.replace(staging / output.name, output)
    except OSError as exc:
        raise HyperlexError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_base(source: Path, folder: Path) -> None:
    folder.mkdir()
    for file in _base_files(source):
        shutil.copyfile(file, folder / file.name)
    _portable_configs(folder)


def _portable_configs(folder: Path) -> None:
    """Add the legacy spellings older transformers (as pinned by vLLM) read, next to the ones
    transformers 5 writes: ``rope_theta``/``torch_dtype`` in config.json, and a tokenizer class
    that exists in both. Without them an older stack silently uses the default rope base or
    cannot load the tokenizer. Weights are never touched."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    changed = False
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        changed = True
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
        changed = True
    if changed:
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer_file = folder / "tokenizer_config.json"
    if tokenizer_file.is_file():
        tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        if tokenizer.get("tokenizer_class") == "TokenizersBackend" \
                and (folder / "tokenizer.json").is_file():
            tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_file.write_text(json.dumps(tokenizer, indent=2) + "\n", encoding="utf-8")
