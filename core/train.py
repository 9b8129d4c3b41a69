"""LoRA training of a persona adapter on its bundle's data (loss on the persona's replies only).

Run as ``python -m hyperlex.train BUNDLE_DIR`` (``make train-philosopher`` trains the built-in
philosopher). The adapter is written in PEFT format into the bundle's ``adapter/`` together
with ``training_card.json`` (data hash, configuration, losses, wall time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hyperlex.errors import HyperlexError
from hyperlex.persona import BUNDLE_FILE, Persona, read_bundle_yaml

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    learning_rate: float = 1e-3
    epochs: int = 4
    batch_size: int = 8
    max_length: int = 320
    seed: int = 0
    data: str = "data/train.jsonl"
    heldout: str = "data/heldout.jsonl"


def read_records(path: Path) -> list[dict[str, str]]:
    """Read ``{"human", "text"}`` JSONL records; every bad line is reported with its number."""
    records, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: invalid JSON: {exc.msg}")
            continue
        missing = [
            k
            for k in ("human", "text")
            if not isinstance(record, dict)
            or not isinstance(record.get(k), str)
            or not record[k].strip()
        ]
        if missing:
            problems.append(f"{path}:{number}: missing or empty field(s): {', '.join(missing)}")
            continue
        records.append(record)
    if problems:
        raise HyperlexError("bad training data:\n" + "\n".join(problems))
    if not records:
        raise HyperlexError(f"{path}: no training records")
    return records


def encode_example(
    tokenizer: Any, system: str, human: str, reply: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids for one exchange, and labels that mask everything but the reply."""
    prompt = [{"role": "system", "content": system}, {"role": "user", "content": human}]
    full = [*prompt, {"role": "assistant", "content": reply}]
    prompt_ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full_ids = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise HyperlexError(
            "the chat template does not render the prompt as a prefix of the "
            "full exchange; cannot mask the prompt"
        )
    ids = full_ids[:max_length]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return ids, labels[:max_length]


def _batches(examples: list[tuple[list[int], list[int]]], size: int, pad_id: int):
    import torch

    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (x, y) in enumerate(chunk):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _mean_loss(model: Any, examples: list, batch_size: int, pad_id: int) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(examples, batch_size, pad_id):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def train(bundle: Path, config: TrainConfig, base: str | None = None) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from hyperlex.models import load_base, resolve_base

    bundle = bundle.resolve()
    data = read_bundle_yaml(bundle)
    if isinstance(data, dict):
        data.pop("adapter", None)  # the adapter is what this run produces
    persona = Persona.from_mapping(data, root=bundle, file=bundle / BUNDLE_FILE)
    resolved = resolve_base(base)
    if persona.base_model.lower() != resolved.name:
        raise HyperlexError(f"{bundle / BUNDLE_FILE}: base_model is {persona.base_model!r} but "
                            f"training would use {resolved.name!r}; change base_model or --base")
    data_path = bundle / config.data
    if not data_path.is_file():
        raise HyperlexError(f"{data_path}: training data not found")
    records = read_records(data_path)
    heldout_path = bundle / config.heldout
    heldout = read_records(heldout_path) if heldout_path.is_file() else []

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer = load_base(resolved)
    system = persona.system_message()
    examples = [
        encode_example(tokenizer, system, r["human"], r["text"], config.max_length) for r in records
    ]
    held = [
        encode_example(tokenizer, system, r["human"], r["text"], config.max_length) for r in heldout
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps)
    )

    start, losses = time.time(), []
    with tqdm(total=steps, desc=f"training {persona.name}", unit="step", file=sys.stderr) as bar:
        for _epoch in range(config.epochs):
            order = examples[:]
            random.shuffle(order)
            for batch in _batches(order, config.batch_size, pad_id):
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()

    adapter_dir = bundle / "adapter"
    # Name the base as bundles do, not by this machine's cache path.
    model.peft_config["default"].base_model_name_or_path = resolved.name
    model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    card = {
        "persona": persona.name,
        "base_model": resolved.name,
        "data": {
            "file": config.data,
            "records": len(records),
            "sha256": hashlib.sha256(data_path.read_bytes()).hexdigest(),
        },
        "config": asdict(config),
        "steps": steps,
        "first_loss": losses[0],
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "heldout_loss": _mean_loss(model, held, config.batch_size, pad_id) if held else None,
        "wall_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    (adapter_dir / "training_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlex.train", description=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--base", default=None)
    for name, default in asdict(TrainConfig()).items():
        if name != "target_modules":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("bundle", "base")}
    try:
        card = train(args.bundle, TrainConfig(**values), base=args.base)
    except HyperlexError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
