"""A Hugging Face Llama base as a GGUF file for llama.cpp (``write_base_gguf``): an F32/F16
GGUF of exactly the same weights, so llama.cpp agrees with transformers + PEFT, plus the
choice of GGUF for an engine (``base_gguf``) and its cache. Written with the ``gguf``
package's ``GGUFWriter``; q and k rows get llama.cpp's rotary permutation as in
``hyperlex.engines.llamacpp.gguf_lora``."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperlex.engines.llamacpp.gguf_lora import (
    CONVERTER_VERSION,
    MODULES,
    base_shape,
    permute_qk,
    write_atomically,
)
from hyperlex.errors import HyperlexError
from hyperlex.paths import gguf_dir

if TYPE_CHECKING:
    from hyperlex.engines.models import ResolvedBase

_BASE_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    **MODULES,
}
_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")

# Hugging Face pre-tokenizers -> llama.cpp's pre-tokenizer names (llama-vocab.cpp).
_GPT2_SPLIT = {"type": "ByteLevel", "use_regex": True}
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    def is_(step: dict[str, Any], **fields: Any) -> bool:
        return all(step.get(k, True if k == "use_regex" else None) == v for k, v in fields.items())

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and is_(steps[0], **_GPT2_SPLIT):
        return "gpt-2"
    if (len(steps) == 2 and is_(steps[0], type="Digits", individual_digits=True)
            and is_(steps[1], **_GPT2_SPLIT)):
        return "smollm"
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_REGEX
            and is_(steps[1], type="ByteLevel", use_regex=False)):
        return "llama-bpe"
    return None


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int, pre: str | None) -> None:
    from gguf import SpecialVocab, TokenType

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise HyperlexError(f"{model_dir}: no tokenizer.json (a fast byte-level BPE tokenizer "
                            "is needed for a GGUF base)")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    decoder = tokenizer.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get(
            "type") != "ByteLevel":
        raise HyperlexError(f"{path}: only byte-level BPE tokenizers (GPT-2 style) can be written "
                            "to GGUF by hyperlex")
    pre = pre or _detect_pre_tokenizer(tokenizer)
    if pre is None:
        raise HyperlexError(
            f"{path}: unknown pre-tokenizer {json.dumps(tokenizer.get('pre_tokenizer'))[:200]}; "
            "pass pre= with llama.cpp's name for it"
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [TokenType.NORMAL] * vocab_size
    for text, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id] = text
    for added in tokenizer.get("added_tokens", []):
        token_id = added["id"]
        if token_id >= vocab_size:
            raise HyperlexError(f"{path}: added token {added['content']!r} has id {token_id}, "
                                f"beyond the model's vocab_size {vocab_size}")
        tokens[token_id] = added["content"]
        types[token_id] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    for token_id, text in enumerate(tokens):
        if text is None:
            tokens[token_id] = f"[PAD{token_id}]"
            types[token_id] = TokenType.UNUSED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    for kind in ("bos", "eos"):  # written explicitly: llama.cpp's defaults vary by model
        special.add_special_token.setdefault(kind, False)
    special.add_to_gguf(writer, quiet=True)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise HyperlexError(f"{model_dir}: weights are pickle files, which hyperlex never loads; "
                            "save the model as safetensors")
    raise HyperlexError(f"{model_dir}: no model.safetensors")


def _rope(config: dict[str, Any]) -> tuple[float, str, float | None]:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor") or scaling.get("factor")
    return theta, kind, factor


def write_base_gguf(model_dir: Path, out: Path, dtype: str = "f32",
                    pre: str | None = None) -> Path:
    """Write a Hugging Face Llama directory (config.json, safetensors, tokenizer.json) as an
    F32 or F16 GGUF that llama.cpp runs on exactly the same weights (norms stay F32).

    ``pre`` overrides llama.cpp's pre-tokenizer name when it cannot be detected.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
    from safetensors import safe_open

    if dtype not in ("f32", "f16"):
        raise HyperlexError(f"GGUF dtype {dtype!r}: expected f32 or f16")
    model_dir, out = Path(model_dir), Path(out)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise HyperlexError(f"{model_dir}: no config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    shape = base_shape(config)
    if config.get("hidden_act", "silu") != "silu":
        raise HyperlexError(f"{config_path}: hidden_act {config['hidden_act']!r} is not silu")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise HyperlexError(f"{config_path}: Llama bases with biases are not supported")
    theta, rope_kind, rope_factor = _rope(config)
    if rope_kind not in ("default", "linear"):
        raise HyperlexError(f"{config_path}: rope type {rope_kind!r} is not supported")
    vocab_size = int(config["vocab_size"])

    writer = GGUFWriter(None, shape.arch)
    writer.add_type("model")
    writer.add_name(config.get("_name_or_path") or model_dir.name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim * shape.n_head != shape.n_embd:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(theta)
    if rope_kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_factor or 1.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, model_dir, vocab_size, pre)

    tied = bool(config.get("tie_word_embeddings", False))
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue
                name, module = _base_tensor_name(key)
                tensor = weights.get_tensor(key).float().numpy()
                if module == "self_attn.q_proj":
                    tensor = permute_qk(tensor, shape.n_head)
                elif module == "self_attn.k_proj":
                    tensor = permute_qk(tensor, shape.n_head_kv)
                if dtype == "f16" and tensor.ndim > 1:
                    writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float16),
                                      raw_dtype=GGMLQuantizationType.F16)
                else:
                    writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32),
                                      raw_dtype=GGMLQuantizationType.F32)
    write_atomically(writer, out)
    return out


def _base_tensor_name(key: str) -> tuple[str, str | None]:
    if key in _BASE_TENSORS:
        return _BASE_TENSORS[key], None
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"blk.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.weight", match.group(2)
    raise HyperlexError(f"unexpected tensor {key} in a Llama checkpoint")


def cached_base_gguf(model_dir: Path, dtype: str = "f32", progress: bool = False) -> Path:
    """``write_base_gguf`` once per model directory state, cached under ``gguf_dir()/bases``.

    Keyed by the files' names, sizes and modification times rather than their bytes: hashing
    a multi-GB checkpoint on every start would cost more than it saves.
    """
    model_dir = Path(model_dir).resolve()
    digest = hashlib.sha256(f"hyperlex-gguf-base {CONVERTER_VERSION} {dtype}\n".encode())
    digest.update(str(model_dir).encode())
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"\n{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    target = gguf_dir() / "bases" / f"{model_dir.name}-{dtype}-{digest.hexdigest()[:24]}.gguf"
    if target.is_file():
        return target
    if progress:
        print(f"Writing an {dtype.upper()} GGUF of {model_dir.name} for llama.cpp (once; cached "
              f"in {target.parent})", file=sys.stderr)
    return write_base_gguf(model_dir, target, dtype)


def base_gguf(base: ResolvedBase, exact: bool = False, progress: bool = True) -> Path:
    """The GGUF llama.cpp runs for a resolved base: the embedded Q4_1 file as it is, or with
    ``exact`` an F32 GGUF of the weights transformers runs (identical logits); a local
    directory becomes an F32 (``exact``) or F16 GGUF."""
    from hyperlex.engines.models import embedded_gguf, ensure_embedded

    if base.kind == "embedded":
        if not exact:
            return embedded_gguf()
        return cached_base_gguf(ensure_embedded(progress), "f32", progress)
    if base.kind == "local":
        return cached_base_gguf(Path(base.source), "f32" if exact else "f16", progress)
    raise HyperlexError(
        f"the llama.cpp engine needs the base on disk; download {base.source!r} (e.g. "
        "`huggingface-cli download`) and pass its directory as the base"
    )
