"""Attaching persona adapters to the torch engine's LoRA layers quickly, without PEFT's
general ``load_adapter`` when the adapter is plain LoRA on layers that already exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hyperlex.errors import HyperlexError
from hyperlex.persona.bundle import ADAPTER_WEIGHTS, Persona


def keep_stored_dtype(layers: list[Any], name: str, adapter_dir: Path) -> None:
    """Hold the adapter's weights in the dtype they were stored in (PEFT upcasts them to the
    base's dtype). A bfloat16 adapter then costs half the memory; the LoRA layer casts its
    input to that dtype and adds the result to the base output in full precision."""
    from safetensors import safe_open

    with safe_open(adapter_dir / ADAPTER_WEIGHTS, "pt") as weights:
        first = next(iter(weights.keys()), None)
        stored = weights.get_slice(first).get_dtype() if first else None
    dtype = {"BF16": "bfloat16", "F16": "float16"}.get(stored or "")
    if dtype is None:
        return
    import torch

    target = getattr(torch, dtype)
    for layer in layers:
        for modules in (layer.lora_A, layer.lora_B):
            if name in modules:
                modules[name].to(target)


def lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


_LAYER_FIELDS = ("r", "lora_alpha", "scaling", "lora_A", "lora_B", "lora_dropout", "lora_bias",
                 "use_rslora", "use_dora")


def attach_to_layers(model: Any, layers: dict[str, Any], persona: Persona) -> bool:
    """Add ``persona``'s adapter to LoRA layers that already exist, straight from its
    safetensors file; False (nothing changed) when it needs PEFT's general ``load_adapter``.

    PEFT's ``load_adapter`` walks the module tree several times, initialises weights it then
    overwrites, and checks every adapter's parameters on each layer; with 31 adapters attached
    the next one takes over a second. A plain LoRA adapter whose tensors all land on existing
    layers (the cast's adapters share their target modules) needs none of that: each layer gets
    the entries PEFT's ``LoraLayer.update_layer`` would make for an inference-only adapter,
    holding the stored tensors. ``tests/test_engine.py`` checks the logits equal PEFT's own
    ``load_adapter`` exactly.
    """
    import math

    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    assert persona.adapter_dir is not None
    config = LoraConfig.from_pretrained(str(persona.adapter_dir))
    if (config.use_dora or config.rank_pattern or config.alpha_pattern or config.lora_bias
            or config.modules_to_save or config.trainable_token_indices
            or config.layer_replication or getattr(config, "use_qalora", False)):
        return False
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(persona.adapter_dir / ADAPTER_WEIGHTS).items():
        module, sep, leaf = key.rpartition(".lora_")
        if not sep or leaf not in ("A.weight", "B.weight") or module not in layers:
            return False
        pairs.setdefault(module, {})[leaf[0]] = tensor
    if not pairs or any(len(pair) != 2 for pair in pairs.values()):
        return False
    for module, pair in pairs.items():
        layer, a, b = layers[module], pair["A"], pair["B"]
        if not all(hasattr(layer, f) for f in (*_LAYER_FIELDS, "in_features", "out_features")):
            return False
        if a.shape != (config.r, layer.in_features) or b.shape != (layer.out_features, config.r):
            raise HyperlexError(f"{module}: adapter tensors {tuple(a.shape)} and "
                                f"{tuple(b.shape)} do not fit the base layer")
    name, r, alpha = persona.name, config.r, config.lora_alpha
    model.peft_config[name] = config
    for module, pair in pairs.items():
        layer = layers[module]
        layer.r[name], layer.lora_alpha[name] = r, alpha
        layer.scaling[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        layer.use_rslora[name], layer.use_dora[name], layer.lora_bias[name] = (
            config.use_rslora, False, False)
        layer.lora_dropout[name] = torch.nn.Identity()  # inference only
        base_dtype = layer.get_base_layer().weight.dtype
        for modules, weight in ((layer.lora_A, pair["A"]), (layer.lora_B, pair["B"])):
            if weight.dtype == torch.float32 and base_dtype.is_floating_point:
                weight = weight.to(base_dtype)  # as PEFT does; 16-bit adapters stay 16-bit
            modules[name] = linear_holding(weight)
    return True


def linear_holding(weight: Any) -> Any:
    """A bias-free ``nn.Linear`` holding ``weight`` as it is (no initialisation, no copy)."""
    import torch

    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta",
                             dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear
