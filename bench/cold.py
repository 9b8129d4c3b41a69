"""P5: cold start of ``agent chat -m`` to its first stdout byte vs a bare transformers script,
and ``agent --help``. Each run is a fresh subprocess."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Config, Row

BARE_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
source = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(source)
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                    add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)
with torch.inference_mode():
    out = model.generate(**ids, max_new_tokens=1, do_sample=False)
sys.stdout.write(tokenizer.decode(out[0, ids["input_ids"].shape[1]:]) or "?")
sys.stdout.flush()
"""


def agent_command() -> list[str]:
    script = Path(sys.executable).with_name("agent")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from hyperlex.cli import main; main()"]


def first_byte_seconds(command: list[str], env: dict[str, str], timeout: float = 600) -> float:
    """Seconds from spawning ``command`` to its first byte on stdout (it is then left to
    finish; a command that prints nothing raises)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    seconds = time.perf_counter() - start
    proc.communicate(timeout=timeout)
    if not first:
        raise RuntimeError(f"no output from {' '.join(command)} (exit {proc.returncode})")
    return seconds


def wall_seconds(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                   check=True)
    return time.perf_counter() - start


def cold_start(config: Config) -> list[Row]:
    from hyperlex.engines.models import ensure_embedded

    env = dict(os.environ)
    repeats = config.repeats
    help_s = statistics.median(wall_seconds([*agent_command(), "--help"], env)
                               for _ in range(repeats))
    help_row = Row("P5h", "agent --help wall time", help_s, unit="s", target="< 1 s",
                   met=help_s < 1.0)
    what = "cold start: agent chat -m to first stdout byte (vs bare transformers)"
    if config.base is not None:  # the shipped cast is trained on the embedded base only
        return [Row("P5", what, target="<= 1.3x",
                    note="skipped: needs the embedded base (no --base)"), help_row]
    source = str(ensure_embedded(progress=False))  # convert once, outside the timing
    chat = [*agent_command(), "chat", "-p", "philosopher", "-m", "Hi", "-o", "max_new_tokens",
            "1", "-o", "temperature", "0", "--no-store", "--engine", "torch"]
    bare = [sys.executable, "-c", BARE_SCRIPT, source]
    first_byte_seconds(chat, env)  # warm the OS file cache for both
    first_byte_seconds(bare, env)
    ours = statistics.median(first_byte_seconds(chat, env) for _ in range(repeats))
    theirs = statistics.median(first_byte_seconds(bare, env) for _ in range(repeats))
    ratio = ours / theirs
    return [Row("P5", what, ours, theirs, unit="s", alt_label="bare script", ratio=ratio,
                target="<= 1.3x", met=ratio <= 1.3, details={"command": chat}), help_row]
