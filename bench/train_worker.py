"""One training run for P7, in a process of its own so that its peak memory is its own:
``python -m bench.train_worker MODE BUNDLE BASE [OPTIONS_JSON]`` prints one JSON line
(OPTIONS_JSON: more training options, e.g. ``{"micro_batch_size": 2}``).

MODE ``hyperlex`` runs ``hyperlex.training.train.train`` (what ``agent train`` runs, with the
machine's memory as its budget: whole batches), ``qlora`` the same with a 4-bit base,
``lora-gc`` / ``qlora-gc`` those two with gradient checkpointing, ``lora-3g`` / ``qlora-3g``
those two within a 3 GiB budget (``agent train --max-memory 3G``), and ``hand`` a minimal
hand-written PEFT loop (full logits, whole batches) over the same encoded batches in the same
order.
Tokens/s counts the non-padding tokens of every step after the first (the first pays one-off
costs), over the time those steps took.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

BUDGET = 3 * 2**30  # the target for training a cast persona


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def encoded_batches(bundle: Path, tokenizer: Any, config: Any) -> list[list[tuple]]:
    """The batches ``train`` forms for its first epoch: same encoding, same shuffle."""
    from hyperlex.persona.bundle import Persona
    from hyperlex.training.data import read_dataset
    from hyperlex.training.train import encode_example

    persona = Persona.from_dir(bundle)
    examples = [encode_example(tokenizer, persona, e, config.max_length)
                for e in read_dataset(bundle / config.data)]
    random.Random(config.seed).shuffle(examples)
    size = config.batch_size
    return [examples[i:i + size] for i in range(0, len(examples), size)]


def hand_loop(base: str | None, config: Any, batches: list[list[tuple]],
              stamps: list[float]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from hyperlex.engines.models import load_base, resolve_base
    from hyperlex.training.train import batches as train_batches

    torch.manual_seed(config.seed)
    model, tokenizer = load_base(resolve_base(base), progress=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = get_peft_model(model, LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules), task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate)
    for chunk in batches:
        batch = next(train_batches(chunk, len(chunk), pad))
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())


def main(argv: list[str]) -> None:
    mode, bundle, base = argv[0], Path(argv[1]), (argv[2] if argv[2] != "-" else None)
    extra = json.loads(argv[3]) if len(argv) > 3 else {}  # more training options
    # every mode pays the same imports before the memory baseline
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoTokenizer

    from hyperlex.engines.models import ensure_embedded, resolve_base
    from hyperlex.training.memory import resident_memory
    from hyperlex.training.train import load_config, train

    config = load_config(bundle, {"epochs": 1, "qlora": mode.startswith("qlora"),
                                  "gradient_checkpointing": mode.endswith("-gc"), **extra})
    budget = BUDGET if mode.endswith("-3g") else None
    resolved = resolve_base(base)
    source = str(ensure_embedded(False)) if resolved.kind == "embedded" else resolved.source
    batches = encoded_batches(bundle, AutoTokenizer.from_pretrained(source), config)
    baseline = resident_memory()
    stamps: list[float] = []  # when each step ended
    plan = None
    if mode == "hand":
        hand_loop(base, config, batches, stamps)
    else:
        card = train(bundle, config, base=base, progress=False, max_memory=budget,
                     on_step=lambda step, loss: stamps.append(time.perf_counter()))
        plan = card["memory_plan"]
    tokens = [sum(len(ids) for ids, _ in chunk) for chunk in batches]
    # step k's time is stamps[k] - stamps[k - 1]; the first step (one-off costs) is not counted
    seconds = stamps[-1] - stamps[0]
    counted = sum(tokens[1:len(stamps)])
    print(json.dumps({
        "mode": mode, "steps": len(stamps),
        "step_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "step_tokens": tokens[:len(stamps)],
        "tokens_per_s": counted / seconds if seconds > 0 else None,
        "baseline_rss": baseline, "peak_rss": peak_rss(),
        "peak_delta_bytes": peak_rss() - baseline, "memory_plan": plan,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
