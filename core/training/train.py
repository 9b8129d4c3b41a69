"""LoRA / QLoRA training of a persona adapter from its bundle (``agent train BUNDLE``).

The configuration comes from the bundle's ``train.yaml`` with command-line overrides. Each
exchange is rendered through the chat template with the persona's own system message (the
record's scene and field filled in), and the loss covers only the persona's reply. The
adapter is written in PEFT format into ``BUNDLE/adapter`` with ``training_card.json``.
Ctrl-C saves a checkpoint in ``BUNDLE/.checkpoint``; ``--resume`` continues from it and
gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hyperlex.engines.torch.generation import encode_exchange, pad_token_id
from hyperlex.errors import HyperlexError
from hyperlex.persona.bundle import BUNDLE_FILE, Persona, read_bundle_yaml, read_yaml
from hyperlex.persona.prompt import ChatTemplateCounter, example_prompt
from hyperlex.training.data import Example, read_dataset
from hyperlex.training.loss import reply_loss, reply_states, reply_terms, sum_terms
from hyperlex.training.memory import default_budget, plan_memory, resident_memory

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_FILE = "train.yaml"
CHECKPOINT_DIR = ".checkpoint"
SAVE_DTYPES = ("float32", "bfloat16", "float16")
ANCHOR_BYTES_PER_STATE = 4  # an anchor's hidden states are kept in float32


@dataclass(frozen=True)
class TrainConfig:
    r: int = 6
    alpha: int = 12
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    learning_rate: float = 1e-3
    epochs: int = 3
    batch_size: int = 8
    max_length: int = 320
    seed: int = 0
    qlora: bool = False
    gradient_checkpointing: bool = False
    save_dtype: str = "bfloat16"
    data: str = "data/train.jsonl"
    heldout: str = "data/heldout.jsonl"
    # more JSONL files trained on with ``data`` (a self-distillation round's data/faithful.jsonl)
    extra_data: tuple[str, ...] = ()
    # start from this adapter's weights instead of a fresh LoRA (a further round over "adapter/")
    init_adapter: str = ""
    # hold every reply position's distribution near this adapter's: anchor_weight x
    # KL(anchor || model) beside the cross-entropy (hyperlex.training.loss)
    anchor_adapter: str = ""
    anchor_weight: float = 1.0
    # files of data/extra_data whose records the anchor does not hold: the round's new data
    unanchored_data: tuple[str, ...] = ()
    # reply positions whose logits are computed at a time (0: as many as fit 128 MiB;
    # hyperlex.training.loss)
    loss_chunk: int = 0
    # rows per forward/backward pass, their gradients accumulated up to batch_size (0: the
    # most that fit the memory budget; hyperlex.training.memory)
    micro_batch_size: int = 0

    def updated(self, values: dict[str, Any], where: str) -> TrainConfig:
        """A copy with ``values`` applied, each checked and converted; errors name ``where``."""
        known = {f.name: f for f in fields(self)}
        changes = {}
        for key, value in values.items():
            if key not in known:
                raise HyperlexError(f"{where}: unknown training option {key!r}; known options: "
                                    f"{', '.join(known)}")
            changes[key] = _convert(key, value, type(getattr(self, key)), where)
        return dataclasses.replace(self, **changes)


def _convert(key: str, value: Any, kind: type, where: str) -> Any:
    try:
        if kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            converted: Any = tuple(str(item).strip() for item in items if str(item).strip())
            if not converted:
                raise ValueError
        elif kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            converted = value
        elif kind is int:
            if isinstance(value, bool) or int(value) != float(value):
                raise ValueError
            converted = int(value)
        else:
            converted = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise HyperlexError(f"{where}: {key} must be {kind.__name__}, got {value!r}") from None
    positive = ("r", "alpha", "epochs", "batch_size", "max_length", "learning_rate",
                "anchor_weight")
    if key in positive and not converted > 0:
        raise HyperlexError(f"{where}: {key} must be > 0, got {value!r}")
    if key in ("loss_chunk", "micro_batch_size") and converted < 0:
        raise HyperlexError(f"{where}: {key} must be >= 0 (0: automatic), got {value!r}")
    if key == "dropout" and not 0 <= converted < 1:
        raise HyperlexError(f"{where}: dropout must be in [0, 1), got {value!r}")
    if key == "save_dtype" and converted not in SAVE_DTYPES:
        raise HyperlexError(f"{where}: save_dtype must be one of {', '.join(SAVE_DTYPES)}")
    return converted


def load_config(bundle: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The bundle's ``train.yaml`` (if any) over the defaults, then command-line overrides."""
    config = TrainConfig()
    file = bundle / TRAIN_FILE
    if file.is_file():
        data = read_yaml(file) or {}
        if not isinstance(data, dict):
            raise HyperlexError(f"{file}: must be a mapping of training options")
        config = config.updated(data, str(file))
    return config.updated({k: v for k, v in (overrides or {}).items() if v is not None},
                          "command line")


def bundle_chat_examples(root: Path, besides: Path | None = None) -> list[Example]:
    """The chat records of every data file of the bundle at ``root`` but its held-out set
    (``train.yaml``'s ``heldout``) and ``besides``: what the bundle's voice is trained on."""
    skipped = {(root / load_config(root).heldout).resolve(),
               besides.resolve() if besides else None}
    return [example for path in sorted((root / "data").glob("*.jsonl"))
            if path.resolve() not in skipped
            for example in read_dataset(path) if example.is_chat]


def encode_example(tokenizer: Any, persona: Persona, example: Example,
                   max_length: int) -> tuple[list[int], list[int]]:
    """Token ids for one exchange, and labels that mask everything but the reply. The prompt
    is the one a conversation gives ``persona`` (:func:`hyperlex.persona.prompt.example_prompt`,
    scene budget counted with this tokenizer). A plain record is its text alone, every token
    but the first a target, as :meth:`TorchEngine.text_nll` scores text."""
    if example.plain:
        ids = tokenizer(example.text)["input_ids"][:max_length]
        return ids, [-100] + ids[1:]
    prompt = example_prompt(persona, example, ChatTemplateCounter(tokenizer))
    prompt_ids, full_ids = encode_exchange(tokenizer, prompt, example.text)
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids[:max_length], labels[:max_length]


def batches(examples: list[tuple[list[int], list[int]]], size: int,
            pad_id: int) -> Iterator[dict[str, Any]]:
    """Encoded exchanges in order, ``size`` at a time, right-padded into tensors (padded
    positions masked out and labelled -100)."""
    import torch

    for start in range(0, len(examples), size):
        chunk = examples[start:start + size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (x, y) in enumerate(chunk):
            ids[row, :len(x)] = torch.tensor(x)
            labels[row, :len(y)] = torch.tensor(y)
            mask[row, :len(x)] = 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _groups(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def accumulate(model: Any, examples: list[tuple[list[int], list[int]]], micro_batch: int,
               pad_id: int, chunk: int | None = None, anchors: list[Any] | None = None,
               anchor_weight: float = 1.0) -> tuple[float, float | None]:
    """Forward and backward ``examples`` (one optimiser batch) in micro-batches of
    ``micro_batch`` rows, each loss weighted by its share of the batch's reply tokens, so the
    gradients add up to the whole batch's mean-loss gradient. With ``anchors`` (each
    example's :func:`reply_states` under the anchor adapter, None for one it does not hold)
    the loss adds ``anchor_weight`` x KL. Return the batch's mean cross-entropy and mean KL
    per reply token (None without anchors)."""
    parts = list(batches(examples, micro_batch, pad_id))
    counts = [int((part["labels"][:, 1:] != -100).sum()) for part in parts]
    total = sum(counts)
    means = [0.0, 0.0]
    for index, (part, count) in enumerate(zip(parts, counts, strict=True)):
        if count == 0:
            continue
        rows = anchors[index * micro_batch:(index + 1) * micro_batch] if anchors else None
        terms = reply_terms(model, part, chunk, *_held_rows(rows, part))
        (sum_terms(terms, anchor_weight) * (count / total)).backward()
        for slot, term in enumerate(terms):
            if term is not None:
                means[slot] += term.item() * count / total
    return means[0], means[1] if anchors else None


def _held_rows(rows: list[Any] | None, part: dict[str, Any]) -> tuple[Any, Any]:
    """The anchor states of a micro-batch's rows, concatenated, and where they hold: the
    rows whose anchor is None get zeros there and are not held."""
    import torch

    if not rows or all(row is None for row in rows):
        return None, None
    counts = (part["labels"][:, 1:] != -100).sum(dim=1).tolist()
    width = next(row for row in rows if row is not None).shape[1]
    states = [row if row is not None else torch.zeros(n, width)
              for row, n in zip(rows, counts, strict=True)]
    held = [torch.full((n,), row is not None) for row, n in zip(rows, counts, strict=True)]
    return torch.cat(states), torch.cat(held)


def anchor_states(model: Any, examples: list[tuple[list[int], list[int]]], micro_batch: int,
                  pad_id: int, progress: bool = False) -> list[Any]:
    """Each example's final hidden states at its reply positions under ``model`` as it is
    now (dropout off): the anchor a round is held to."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    states: list[Any] = []
    with tqdm(total=len(examples), desc="anchor states", unit="record", file=sys.stderr,
              disable=not progress) as bar:
        for part in batches(examples, micro_batch, pad_id):
            states += reply_states(model, part)
            bar.update(len(part["input_ids"]))
    model.train(was_training)
    return states


def mean_loss(model: Any, examples: list, batch_size: int, pad_id: int,
              chunk: int | None = None) -> float:
    """Token-weighted mean loss over reply tokens."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(examples, batch_size, pad_id):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(reply_loss(model, batch, chunk)) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def _inside(bundle: Path, relative: str, key: str) -> Path:
    """``bundle / relative``, refused unless it stays inside the bundle directory."""
    path = (bundle / relative).resolve()
    if not path.is_relative_to(bundle):
        raise HyperlexError(f"{key}: {relative!r} points outside the bundle directory {bundle}")
    return path


def _saved_adapter(bundle: Path, config: TrainConfig,
                   key: str = "init_adapter") -> tuple[dict[str, Any], dict[str, Any]]:
    """The weights (safetensors only) and training card of the adapter that ``config``'s
    ``key`` names (``init_adapter`` or ``anchor_adapter``), checked to have the shape this
    run trains."""
    from safetensors.torch import load_file

    where = _inside(bundle, getattr(config, key), key)
    weights, settings = where / "adapter_model.safetensors", where / "adapter_config.json"
    if not weights.is_file() or not settings.is_file():
        raise HyperlexError(f"{key}: {where} has no adapter_config.json and "
                            "adapter_model.safetensors (train the bundle once without it)")
    saved = json.loads(settings.read_text(encoding="utf-8"))
    wanted = {"r": config.r, "lora_alpha": config.alpha,
              "target_modules": sorted(config.target_modules)}
    found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
             "target_modules": sorted(saved.get("target_modules") or [])}
    if found != wanted:
        raise HyperlexError(f"{key}: {where} was trained with {found}, but this run "
                            f"trains {wanted}; match r, alpha and target_modules")
    card_file = where / "training_card.json"
    card = json.loads(card_file.read_text(encoding="utf-8")) if card_file.is_file() else {}
    return {k: v.float() for k, v in load_file(weights).items()}, card


def _tail_mean(values: list[float]) -> float | None:
    """The mean of the last five steps' values: a round's final loss, less noisy than one."""
    return sum(values[-5:]) / len(values[-5:]) if values else None


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


class TrainingInterrupted(HyperlexError):
    pass


class _StopAfterStep:
    """The first Ctrl-C asks training to stop after the current step, so the checkpoint is
    taken between steps (exactly resumable); a second Ctrl-C aborts at once."""

    def __init__(self, bar: Any):
        self.requested = False
        self.aborted = False
        self.bar = bar
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.aborted = True
            raise KeyboardInterrupt
        self.requested = True
        self.bar.write("Stopping after this step to save a checkpoint (Ctrl-C again to abort "
                       "without one)")

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def train(bundle: Path, config: TrainConfig, base: str | None = None, resume: bool = False,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          max_memory: int | None = None) -> dict[str, Any]:
    """Train the bundle's adapter; return the training card. Raises TrainingInterrupted after
    saving a checkpoint when interrupted (Ctrl-C). The micro-batch size and gradient
    checkpointing are chosen to fit ``max_memory`` bytes (default: what the machine has
    available, less a margin; :mod:`hyperlex.training.memory`)."""
    from hyperlex.engines.models import load_base, quiet_libraries, resolve_base

    quiet_libraries()
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm import tqdm

    bundle = bundle.resolve()
    data = read_bundle_yaml(bundle)
    declared = data.pop("adapter", None) if isinstance(data, dict) else None
    # (the adapter is what this run produces, so it need not exist yet)
    persona = Persona.from_mapping(data, root=bundle, file=bundle / BUNDLE_FILE)
    resolved = resolve_base(base)
    if persona.base_model.lower() != resolved.name:
        raise HyperlexError(f"{bundle / BUNDLE_FILE}: base_model is {persona.base_model!r} but "
                            f"training would use {resolved.name!r}; change base_model or --base")
    data_path, heldout_path = (_inside(bundle, getattr(config, key), key)
                               for key in ("data", "heldout"))
    mix = [(config.data, data_path, read_dataset(data_path))]
    mix += [(f, path, read_dataset(path)) for f in config.extra_data
            if (path := _inside(bundle, f, "extra_data"))]
    records = [record for _, _, part in mix for record in part]
    heldout = read_dataset(heldout_path) if heldout_path.is_file() else []
    data_hash = _digest(*(path for _, path, _ in mix))
    init = _saved_adapter(bundle, config) if config.init_adapter else None
    anchor = _saved_adapter(bundle, config, "anchor_adapter") if config.anchor_adapter else None
    stray = set(config.unanchored_data) - {f for f, _, _ in mix}
    if stray:
        raise HyperlexError(f"unanchored_data: {', '.join(sorted(stray))} is not among the "
                            f"training files ({', '.join(f for f, _, _ in mix)})")
    if config.unanchored_data and anchor is None:
        raise HyperlexError("unanchored_data: there is no anchor_adapter to leave them out of")
    checkpoint = bundle / CHECKPOINT_DIR
    state = _read_checkpoint(checkpoint, config, data_hash) if resume else None

    torch.manual_seed(config.seed)
    model, tokenizer = load_base(resolved, quantize="nf4" if config.qlora else None)
    pad_id = pad_token_id(tokenizer)

    def encode(items: list[Example], path: Path) -> list[tuple[list[int], list[int]]]:
        encoded = [encode_example(tokenizer, persona, e,
                                  config.max_length) for e in items]
        cut = [e.line for e, (_, labels) in zip(items, encoded, strict=True)
               if all(label == -100 for label in labels)]
        if cut:
            raise HyperlexError(f"{path}: {len(cut)} record(s) have no reply tokens within "
                                f"max_length={config.max_length} (lines "
                                f"{', '.join(map(str, cut[:10]))}); raise --max-length")
        return encoded

    examples = [item for _, path, part in mix for item in encode(part, path)]
    held = encode(heldout, heldout_path)
    holds = [anchor is not None and f not in config.unanchored_data
             for f, _, part in mix for _ in part]
    anchor_bytes = ANCHOR_BYTES_PER_STATE * model.config.hidden_size * sum(
        sum(label != -100 for label in labels[1:])
        for (_, labels), hold in zip(examples, holds, strict=True) if hold)
    resident = resident_memory()
    memory = plan_memory(config.batch_size, max(len(ids) for ids, _ in examples + held),
                         model.config, resident + anchor_bytes,
                         max_memory or default_budget(resident), config.micro_batch_size,
                         True if config.gradient_checkpointing else None)
    if progress:
        print(f"memory: {memory.describe()}", file=sys.stderr)
    if config.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if memory.gradient_checkpointing:  # recompute activations in backward: less memory
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    anchors = None
    if anchor is not None:
        fresh = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        set_peft_model_state_dict(model, anchor[0])
        states = iter(anchor_states(model, [e for e, hold in zip(examples, holds, strict=True)
                                            if hold], memory.micro_batch, pad_id, progress))
        anchors = [next(states) if hold else None for hold in holds]
        set_peft_model_state_dict(model, fresh)
    if init is not None:
        set_peft_model_state_dict(model, init[0])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    per_epoch = math.ceil(len(examples) / config.batch_size)
    steps = config.epochs * per_epoch
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps))
    step, losses, divergences, elapsed = 0, [], [], 0.0
    if state is not None:
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
        divergences = state.get("divergences", [])

    start = time.time() - elapsed
    bar = tqdm(total=steps, initial=step, desc=f"training {persona.name}", unit="step",
               file=sys.stderr, disable=not progress)
    stop = _StopAfterStep(bar)
    try:
        for epoch in range(step // per_epoch, config.epochs):
            order = list(range(len(examples)))
            random.Random(config.seed + epoch).shuffle(order)  # same order after a resume
            for index, group in enumerate(_groups(order, config.batch_size)):
                if epoch * per_epoch + index < step:
                    continue
                loss, divergence = accumulate(
                    model, [examples[i] for i in group], memory.micro_batch, pad_id,
                    config.loss_chunk or None,
                    [anchors[i] for i in group] if anchors else None, config.anchor_weight)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                losses.append(loss)
                if divergence is not None:
                    divergences.append(divergence)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch + 1,
                                **({"kl": f"{divergence:.3f}"} if divergence is not None else {}))
                bar.update()
                if on_step is not None:
                    on_step(step, losses[-1])
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        stop.restore()
        bar.close()
        if stop.aborted:
            raise TrainingInterrupted(f"aborted during step {step + 1}/{steps}; no checkpoint "
                                      "saved") from None
        _write_checkpoint(checkpoint, config, data_hash, {
            "adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "step": step, "losses": losses, "divergences": divergences,
            "elapsed": time.time() - start})
        raise TrainingInterrupted(
            f"interrupted at step {step}/{steps}; checkpoint saved in {checkpoint}. Continue "
            f"with: agent train {bundle} --resume") from None
    stop.restore()
    bar.close()

    adapter_dir = (bundle / (declared or "adapter")).resolve()
    if not adapter_dir.is_relative_to(bundle):
        raise HyperlexError(f"{bundle / BUNDLE_FILE}: adapter: {declared!r} points outside the "
                            "bundle directory")
    _save_adapter(model, adapter_dir, resolved.name, config.save_dtype)
    card = {
        "persona": persona.name,
        "base_model": resolved.name,
        "data": {"file": config.data, "records": len(records), "sha256": data_hash,
                 "heldout_records": len(heldout),
                 "mix": [{"file": f, "records": len(part), "sha256": _digest(path)}
                         for f, path, part in mix]},
        "round": init[1].get("round", 1) + 1 if init is not None else 1,
        "config": _config_record(config),
        "steps": steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": _tail_mean(losses),
        "heldout_loss": (mean_loss(model, held, config.batch_size, pad_id,
                                   config.loss_chunk or None) if held else None),
        "wall_seconds": round(time.time() - start, 1),
        "peak_memory_mb": round(_peak_rss_mb(), 1),
        "memory_plan": memory.as_dict(),
        "adapter_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size,
        "torch": torch.__version__,
    }
    if anchor is not None:  # the KL is a mean per reply token, like the losses
        card["anchor"] = {"adapter": config.anchor_adapter, "weight": config.anchor_weight,
                          "unanchored_data": list(config.unanchored_data),
                          "round": anchor[1].get("round"),
                          "first_kl": divergences[0] if divergences else None,
                          "final_kl": _tail_mean(divergences)}
    if init is not None:  # what each earlier round trained on, newest last
        previous = {k: init[1].get(k) for k in ("round", "data", "steps", "final_loss",
                                                "heldout_loss")}
        card["init_adapter"] = config.init_adapter
        card["earlier_rounds"] = [*init[1].get("earlier_rounds", []), previous]
    if not declared:  # a prompt-only bundle becomes an adapter-backed one
        yaml_file = bundle / BUNDLE_FILE
        text = yaml_file.read_text(encoding="utf-8")
        yaml_file.write_text(text + ("" if text.endswith("\n") else "\n") + "adapter: adapter/\n",
                             encoding="utf-8")
        card["persona_yaml"] = "added adapter: adapter/"
    (adapter_dir / "training_card.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(checkpoint, ignore_errors=True)
    return card


def _save_adapter(model: Any, adapter_dir: Path, base_name: str, save_dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    # Name the base as bundles do, not by this machine's cache path. (Set before saving,
    # PEFT would try to look the name up on the hub.)
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_name
    if isinstance(config.get("target_modules"), list):  # PEFT writes a set, in any order
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    dtype = getattr(torch, save_dtype)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})


def _config_record(config: TrainConfig) -> dict[str, Any]:
    """The configuration as JSON stores it (tuples as lists)."""
    return {**asdict(config), "target_modules": list(config.target_modules),
            "extra_data": list(config.extra_data),
            "unanchored_data": list(config.unanchored_data)}


def _checkpoint_key(config: TrainConfig, data_hash: str) -> dict[str, Any]:
    return {"config": _config_record(config), "data_sha256": data_hash}


def _write_checkpoint(path: Path, config: TrainConfig, data_hash: str,
                      state: dict[str, Any]) -> None:
    import torch

    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save(state, staging / "state.pt")
    (staging / "checkpoint.json").write_text(json.dumps(_checkpoint_key(config, data_hash)))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)


def _read_checkpoint(path: Path, config: TrainConfig, data_hash: str) -> dict[str, Any]:
    import torch

    meta = path / "checkpoint.json"
    if not meta.is_file():
        raise HyperlexError(f"--resume: no checkpoint in {path}; start without --resume")
    if json.loads(meta.read_text()) != _checkpoint_key(config, data_hash):
        raise HyperlexError(f"--resume: the checkpoint in {path} was made with another "
                            "configuration or dataset; start without --resume to discard it")
    # Our own checkpoint (optimizer state needs pickle); weights_only refuses arbitrary code.
    return torch.load(path / "state.pt", weights_only=True)
