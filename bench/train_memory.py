"""Training memory by micro-batch size and gradient checkpointing (``python -m
bench.train_memory``): the evidence behind ``hyperlex.training.memory``'s per-token costs.

Each configuration trains the P7 bundle (the philosopher's first batches, one epoch) in a
process of its own and reports its total peak RSS, the memory plan's estimate for it, and
seconds per step of the whole batch. Run twice, the peaks differ by up to a third (the C
allocator), so the plan takes the upper envelope.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import Config
from bench.training import run_worker, training_bundle

CONFIGS = [(8, False), (4, False), (2, False), (1, False), (8, True), (2, True)]
GIB = 2**30


def main(argv: list[str]) -> None:
    config = Config(quick="--quick" in argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = training_bundle(config, Path(tmp), 2 if config.quick else 4)
        print(f"{'micro':>5} {'checkpointing':>13} {'estimate':>9} {'peak':>9} {'s/step':>7}")
        for micro, checkpointing in CONFIGS:
            run = run_worker("lora-gc" if checkpointing else "hyperlex", bundle, config.base,
                             {"micro_batch_size": micro})
            steps = run["step_s"]
            print(f"{micro:>5} {'on' if checkpointing else 'off':>13} "
                  f"{run['memory_plan']['estimate_bytes'] / GIB:>8.2f}G "
                  f"{run['peak_rss'] / GIB:>8.2f}G "
                  f"{sum(steps) / max(1, len(steps)):>7.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
