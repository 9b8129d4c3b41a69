"""PEFT LoRA adapters as GGUF LoRA adapters for llama.cpp.

``convert_adapter`` turns a persona's PEFT adapter (safetensors only) into a GGUF LoRA adapter
that llama.cpp applies at run time (``llama_adapter_lora_init``), written with the ``gguf``
package's ``GGUFWriter``; ``cached_gguf_adapter`` converts once per content hash. (The base
itself: ``hyperlex.engines.llamacpp.gguf_base``.)

Two details fail silently when they are wrong, so both are handled here and tested:

1. llama.cpp stores ``attn_q``/``attn_k`` with the rotary row permutation of llama.cpp's
   ``convert_hf_to_gguf.py`` (``LlamaModel.permute``); the rows of the LoRA B matrices of q and
   k are permuted the same way (B only: A acts on the input side, which is not permuted).
2. llama.cpp scales every LoRA product by ``alpha / rank`` (rank read from the tensor, one
   alpha per file; ``alpha == 0`` means a scale of 1). PEFT's scaling is ``alpha / r`` per
   module, ``alpha / sqrt(r)`` with rsLoRA, and ``alpha_pattern`` changes alpha per module.
   When PEFT's scaling is not ``lora_alpha / r`` everywhere, the file gets ``alpha = 0`` and
   PEFT's scaling is folded into B exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperlex.errors import HyperlexError
from hyperlex.paths import gguf_dir

if TYPE_CHECKING:
    import numpy as np


# Bump whenever the bytes written for the same input change: it is part of the cache key.
CONVERTER_VERSION = "1"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# Hugging Face model_type -> llama.cpp architecture.
ARCHITECTURES = {"llama": "llama"}

# PEFT module path (under model.layers.N.) -> llama.cpp tensor name (under blk.N.).
MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_([AB])\.weight$"
)

# adapter_config.json options whose effect a plain GGUF LoRA cannot express.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) is not plain LoRA",
    "lora_bias": "LoRA bias (lora_bias) is not supported by GGUF LoRA adapters",
    "modules_to_save": "modules_to_save (fully trained modules) cannot be a LoRA adapter",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) does not apply to Llama",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "kasa_config": "kasa_config is not supported",
}


@dataclass(frozen=True)
class BaseShape:
    """What the converters need to know about a base model's config."""

    arch: str  # llama.cpp architecture
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int

    def in_out(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {
            "self_attn.q_proj": (self.n_embd, q),
            "self_attn.k_proj": (self.n_embd, kv),
            "self_attn.v_proj": (self.n_embd, kv),
            "self_attn.o_proj": (q, self.n_embd),
            "mlp.gate_proj": (self.n_embd, self.n_ff),
            "mlp.up_proj": (self.n_embd, self.n_ff),
            "mlp.down_proj": (self.n_ff, self.n_embd),
        }[module]


def _config_dict(base_config: BaseConfig) -> dict[str, Any]:
    if isinstance(base_config, Mapping):
        return dict(base_config)
    to_dict = getattr(base_config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return dict(vars(base_config))


def _shape_from_gguf(path: Path) -> BaseShape:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    return shape_from_metadata({key: field.contents() for key, field in fields.items()
                                if key == "general.architecture" or key.startswith(f"{arch}.")},
                               str(path))


def shape_from_metadata(metadata: Mapping[str, Any], where: str = "the base GGUF") -> BaseShape:
    """A base's shape from GGUF metadata (values as GGUFReader or llama.cpp's
    ``Llama.metadata`` give them: numbers or their strings)."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES.values():
        raise HyperlexError(f"{where}: llama.cpp conversion supports Llama bases only; this GGUF "
                            f"has architecture {arch!r}")

    def number(key: str, default: Any = None) -> int:
        return int(metadata.get(f"{arch}.{key}", default))

    n_embd, n_head = number("embedding_length"), number("attention.head_count")
    return BaseShape(
        arch=arch,
        n_layer=number("block_count"),
        n_embd=n_embd,
        n_ff=number("feed_forward_length"),
        n_head=n_head,
        n_head_kv=number("attention.head_count_kv", n_head),
        head_dim=number("attention.key_length", n_embd // n_head),
    )


BaseConfig = Mapping[str, Any] | str | os.PathLike[str] | object


def base_shape(base_config: BaseConfig) -> BaseShape:
    """Read a base's shape from its config: a config.json dict, a transformers config, a model
    directory (its config.json) or the base's GGUF file; a BaseShape is returned as it is."""
    if isinstance(base_config, BaseShape):
        return base_config
    if isinstance(base_config, (str, os.PathLike)):
        path = Path(base_config)
        if path.is_dir():
            path = path / "config.json"
        if path.suffix == ".gguf":
            return _shape_from_gguf(path)
        try:
            base_config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HyperlexError(f"cannot read the base model's config {path}: {exc}") from None
    config = _config_dict(base_config)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HyperlexError(
            f"llama.cpp conversion supports Llama bases only (model_type llama); this base has "
            f"model_type {model_type!r}"
        )
    n_head = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return BaseShape(
        arch=ARCHITECTURES[model_type],
        n_layer=int(config["num_hidden_layers"]),
        n_embd=hidden,
        n_ff=int(config["intermediate_size"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=int(config.get("head_dim") or hidden // n_head),
    )


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py):
    per head, HF's rotate-half layout -> interleaved pairs. ``n_head`` is the number of
    key/value heads for k."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# ---------------------------------------------------------------- LoRA adapters


def _refuse(adapter_dir: Path, reason: str) -> HyperlexError:
    return HyperlexError(f"cannot convert LoRA adapter {adapter_dir} to GGUF: {reason}")


def _adapter_files(adapter_dir: Path) -> tuple[Path, Path]:
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise _refuse(adapter_dir, f"no {ADAPTER_CONFIG}")
    if not weights_path.is_file():
        pickles = [name for name in PICKLE_WEIGHTS if (adapter_dir / name).is_file()]
        if pickles:
            raise _refuse(
                adapter_dir,
                f"{pickles[0]} is a pickle file, which hyperlex never loads (it can run code); "
                f"save the adapter as {ADAPTER_WEIGHTS} (PEFT's default)",
            )
        raise _refuse(adapter_dir, f"no {ADAPTER_WEIGHTS}")
    return config_path, weights_path


def _check_adapter_config(adapter_dir: Path, config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(adapter_dir, f"peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("bias", "none") != "none":
        raise _refuse(adapter_dir, f"LoRA bias (bias={config['bias']!r}) is not supported")
    for option, reason in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise _refuse(adapter_dir, reason)


def _pattern_key(pattern_keys: Any, module_name: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key PEFT would apply to this module
    (same rule as ``peft.utils.other.get_pattern_key``)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _classify_key(adapter_dir: Path, key: str) -> tuple[int, str, str]:
    match = _LORA_KEY.match(key)
    if match:
        return int(match.group(1)), match.group(2), match.group(3)
    if "lora_magnitude_vector" in key:
        reason = "DoRA (lora_magnitude_vector) is not plain LoRA"
    elif "lora_embedding" in key or "embed_tokens" in key:
        reason = f"LoRA on the token embedding ({key}) is not supported"
    elif "lm_head" in key:
        reason = f"LoRA on lm_head ({key}) is not supported"
    elif key.endswith(".bias"):
        reason = f"LoRA bias ({key}) is not supported"
    elif "modules_to_save" in key:
        reason = f"modules_to_save ({key}) cannot be a LoRA adapter"
    elif "trainable_tokens" in key:
        reason = f"trainable tokens ({key}) are not supported"
    else:
        reason = (
            f"unknown target module in {key}; supported: "
            f"{', '.join(m.rsplit('.', 1)[-1] for m in MODULES)} of model.layers.N"
        )
    raise _refuse(adapter_dir, reason)


def convert_adapter(
    adapter_dir: Path,
    out: Path,
    base_config: BaseConfig,
    *,
    _permute_qk: bool = True,
) -> Path:
    """Write ``adapter_dir`` (PEFT LoRA, safetensors) as a GGUF LoRA adapter at ``out``.

    ``base_config`` describes the base (see ``base_shape``: a config dict, a transformers
    config, a model directory or the base's GGUF). ``_permute_qk=False`` leaves the q/k
    permutation out: only tests use it, to show that their agreement check catches it.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFType, GGUFWriter, Keys
    from safetensors import safe_open

    adapter_dir, out = Path(adapter_dir), Path(out)
    config_path, weights_path = _adapter_files(adapter_dir)
    shape = base_shape(base_config)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _refuse(adapter_dir, f"{ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    _check_adapter_config(adapter_dir, config)

    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    with safe_open(str(weights_path), framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            layer, module, side = _classify_key(adapter_dir, key)
            tensor = weights.get_tensor(key).float().numpy().astype(np.float64)
            pairs.setdefault((layer, module), {})[side] = tensor
    if not pairs:
        raise _refuse(adapter_dir, f"{ADAPTER_WEIGHTS} holds no LoRA weights")

    lora_alpha = float(config.get("lora_alpha", 8))
    default_r = int(config.get("r", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora"))

    modules = []  # (layer, module, A, B, PEFT scaling)
    for (layer, module), sides in sorted(pairs.items()):
        where = f"model.layers.{layer}.{module}"
        if set(sides) != {"A", "B"}:
            raise _refuse(adapter_dir, f"{where} has lora_{''.join(sides)} but not both A and B")
        a, b = sides["A"], sides["B"]
        if layer >= shape.n_layer:
            raise _refuse(adapter_dir, f"{where}: the base has only {shape.n_layer} layers")
        n_in, n_out = shape.in_out(module)
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or b.shape != (n_out, rank):
            raise _refuse(
                adapter_dir,
                f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"({n_in} -> {n_out}); was it trained on another base model?",
            )
        r_key = _pattern_key(rank_pattern, where)
        expected_r = int(rank_pattern[r_key]) if r_key is not None else default_r
        if rank != expected_r:
            raise _refuse(adapter_dir, f"{where} has rank {rank} but the config says {expected_r}")
        a_key = _pattern_key(alpha_pattern, where)
        alpha = float(alpha_pattern[a_key]) if a_key is not None else lora_alpha
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules.append((layer, module, a, b, scaling))

    # Keep the config's alpha when llama.cpp's alpha / rank is PEFT's scaling everywhere.
    uniform = lora_alpha != 0 and all(s == lora_alpha / a.shape[0] for _, _, a, _, s in modules)
    file_alpha = lora_alpha if uniform else 0.0

    writer = GGUFWriter(None, shape.arch)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, file_alpha)
    for layer, module, a, b, scaling in modules:
        if not uniform:
            b = b * scaling
        if _permute_qk and module == "self_attn.q_proj":
            b = permute_qk(b, shape.n_head)
        elif _permute_qk and module == "self_attn.k_proj":
            b = permute_qk(b, shape.n_head_kv)
        name = f"blk.{layer}.{MODULES[module]}.weight"
        for suffix, tensor in (("lora_a", a), ("lora_b", b)):
            writer.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(tensor, dtype=np.float32),
                              raw_dtype=GGMLQuantizationType.F32)
    write_atomically(writer, out)
    return out


def write_atomically(writer: Any, out: Path) -> None:
    """Write a GGUF file under a temporary name and rename it into place, so a reader (or a
    concurrent writer) never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)


def adapter_cache_key(adapter_dir: Path, base_config: BaseConfig) -> str:
    """sha256 over the adapter's two files, the base shape the conversion depends on (head
    counts drive the q/k permutation) and the converter version."""
    config_path, weights_path = _adapter_files(Path(adapter_dir))
    digest = hashlib.sha256(f"hyperlex-gguf-lora {CONVERTER_VERSION}\n".encode())
    digest.update(json.dumps(vars(base_shape(base_config)), sort_keys=True).encode())
    for path in (config_path, weights_path):
        digest.update(f"\n{path.name} {path.stat().st_size}\n".encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cached_gguf_adapter(adapter_dir: Path, base_config: BaseConfig) -> Path:
    """The GGUF LoRA adapter for ``adapter_dir``, converted once and cached by content hash
    under ``gguf_dir()/adapters``."""
    target = gguf_dir() / "adapters" / f"{adapter_cache_key(adapter_dir, base_config)}.gguf"
    if target.is_file():
        return target
    return convert_adapter(Path(adapter_dir), target, base_config)
