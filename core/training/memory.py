"""How a training run fits in memory: micro-batches, gradient accumulation, checkpointing.

``agent train`` keeps the configured batch (the optimiser sees the same step) and splits it
into micro-batches whose losses are added with weights, so the gradient is the whole batch's.
Before the first step it estimates the peak resident memory of each way to run, fastest
first, and takes the first that fits the budget (``--max-memory``; by default what the
machine has available, less a margin). When none fits, training is refused before it starts,
with the numbers.

The estimate is the process's resident memory once the model and data are loaded, plus
activations per token of the largest micro-batch. The per-token costs were measured on
SmolLM2-135M (30 layers, hidden 576, MLP 1536) with ``python -m bench.train_memory``, taking
the upper envelope of repeated runs (the C allocator's peaks vary by a third from run to run),
and are scaled to other bases by layers x (hidden + intermediate size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hyperlex.errors import HyperlexError

GIB = 2**30
# bytes of activations per token of a micro-batch, SmolLM2-135M, float32, LoRA on all seven
# projections, without and with gradient checkpointing, and what a step holds besides: lines
# above every peak of python -m bench.train_memory (micro-batches of 1, 2, 4, 8 rows of 221
# tokens peaked 1.89, 2.94, 4.55, 6.68 GiB without checkpointing; 2.04-2.09 and 3.36-4.47
# GiB for 2 and 8 with it, in bench P7's runs too; over 0.48 GiB resident)
PER_TOKEN = {False: 3.9e6, True: 2.0e6}
REFERENCE_WIDTH = 30 * (576 + 1536)  # layers x (hidden + intermediate) of SmolLM2-135M
STEP_OVERHEAD = 0.9 * GIB
MARGIN = 1 * GIB  # kept free of the default budget, for the rest of the machine


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    estimate: int  # bytes, peak resident memory
    budget: int  # bytes

    def describe(self) -> str:
        checkpointing = "on" if self.gradient_checkpointing else "off"
        return (f"micro-batches of {self.micro_batch} x {self.accumulation} accumulated, "
                f"gradient checkpointing {checkpointing}: about {self.estimate / GIB:.1f} GiB "
                f"of the {self.budget / GIB:.1f} GiB budget")

    def as_dict(self) -> dict[str, Any]:
        return {"micro_batch": self.micro_batch, "accumulation": self.accumulation,
                "gradient_checkpointing": self.gradient_checkpointing,
                "estimate_bytes": self.estimate, "budget_bytes": self.budget}


def parse_size(text: str) -> int:
    """Bytes of ``4G``, ``3.5GiB``, ``512M``, ``2000000000``."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(value[-1:], 1)
    try:
        size = float(value[:-1] if scale > 1 else value) * scale
    except ValueError:
        raise HyperlexError(f"--max-memory {text!r}: expected a size such as 3G, 2.5GiB or "
                            "800M") from None
    if not size > 0:
        raise HyperlexError(f"--max-memory {text!r}: must be more than 0")
    return int(size)


def available_memory() -> int:
    """Bytes the machine can give without swapping."""
    import psutil

    return int(psutil.virtual_memory().available)


def resident_memory() -> int:
    """This process's resident memory now, in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def default_budget(resident: int) -> int:
    """What the machine has available (plus what this process already holds), less a
    margin."""
    return resident + available_memory() - MARGIN


def per_token(model_config: Any, checkpointing: bool) -> float:
    """Activation bytes per token of a micro-batch for a model of ``model_config``'s shape."""
    width = model_config.num_hidden_layers * (model_config.hidden_size
                                              + model_config.intermediate_size)
    return PER_TOKEN[checkpointing] * width / REFERENCE_WIDTH


def plan_memory(batch_size: int, longest: int, model_config: Any, resident: int, budget: int,
                micro_batch: int = 0, checkpointing: bool | None = None) -> MemoryPlan:
    """The fastest way to run batches of ``batch_size`` examples of at most ``longest`` tokens
    within ``budget`` bytes: the whole batch at once, then halves, without gradient
    checkpointing before with (``micro_batch`` and ``checkpointing`` fix either). Raises
    :class:`HyperlexError` with the estimates when nothing fits."""
    sizes = [micro_batch] if micro_batch else _halves(batch_size)
    modes = [checkpointing] if checkpointing is not None else [False, True]
    tried = []
    for mode in modes:
        for size in sizes:
            estimate = int(resident + STEP_OVERHEAD + size * longest * per_token(model_config,
                                                                                 mode))
            plan = MemoryPlan(size, math.ceil(batch_size / size), mode, estimate, budget)
            if estimate <= budget:
                return plan
            tried.append(plan)
    smallest = min(tried, key=lambda p: p.estimate)
    raise HyperlexError(
        f"training needs about {smallest.estimate / GIB:.1f} GiB even with micro-batches of "
        f"{smallest.micro_batch} and gradient checkpointing "
        f"{'on' if smallest.gradient_checkpointing else 'off'}, more than the "
        f"{budget / GIB:.1f} GiB budget ({resident / GIB:.1f} GiB already used by the model "
        f"and data; examples up to {longest} tokens). Raise --max-memory, lower --max-length, "
        "or free memory.")


def _halves(size: int) -> list[int]:
    sizes = [size]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes
