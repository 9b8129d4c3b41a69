"""Many resident personas from a few: the shipped cast's bundles (or given ones) copied under
new names p00, p01, ... so that 32 real adapters can be attached beside one base."""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import Config, collect

NAME_LINE = re.compile(r"^name:.*$", re.MULTILINE)


def shipped_bundles() -> list[Path]:
    """The built-in persona bundles that carry an adapter (moods left out)."""
    import hyperlex.personas
    from hyperlex.persona.bundle import Persona

    root = Path(hyperlex.personas.__file__).parent
    found = []
    for yaml in sorted(root.glob("*/persona.yaml")):
        persona = Persona.from_dir(yaml.parent)
        if persona.adapter_dir is not None and not persona.is_mood:
            found.append(yaml.parent)
    return found


def clone_bundle(source: Path, target: Path, name: str) -> Path:
    """Copy a bundle (without its training data) to ``target`` as persona ``name``."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("data", "*.jsonl"))
    yaml = target / "persona.yaml"
    text = NAME_LINE.sub(f"name: {name}", yaml.read_text(encoding="utf-8"), count=1)
    yaml.write_text(text, encoding="utf-8")
    return target


def random_bundle(root: Path, name: str, base_dir: Path, seed: int) -> Path:
    """A bundle with a random (non-zero) r=4 LoRA adapter on every projection of the base in
    ``base_dir``: used when ``--base`` names a model the shipped cast was not trained on."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bundle = root / name
    bundle.mkdir(parents=True)
    (bundle / "persona.yaml").write_text(
        f"name: {name}\ndescription: Benchmark persona {name}.\n"
        f"base_model: {base_dir.resolve().name.lower()}\nadapter: adapter/\n"
        'contract:\n  system: "You are {persona}."\n', encoding="utf-8")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(bundle / "adapter")
    return bundle


class Cast:
    """Cloned personas on disk and the engines built from them (cached between measurements
    of one step, released in between)."""

    def __init__(self, config: Config, workdir: Path):
        self.config = config
        self.workdir = workdir
        self._sources: list[Path] | None = None
        self._clones: list[Any] = []
        self._engines: dict[int, Any] = {}
        self._extra = 0

    def sources(self) -> list[Path]:
        if self._sources is None:
            if self.config.bundles:
                self._sources = [Path(b) for b in self.config.bundles]
            elif self.config.base is not None and Path(self.config.base).is_dir():
                root = self.workdir / "sources"
                self._sources = [random_bundle(root, f"src{i}", Path(self.config.base), i + 1)
                                 for i in range(2)]
            else:
                self._sources = shipped_bundles()
            if not self._sources:
                raise SystemExit("no persona bundles with adapters to clone")
        return self._sources

    def personas(self, count: int) -> list[Any]:
        """``count`` resident personas p00, p01, ... cycling over the source bundles."""
        from hyperlex.persona.bundle import Persona

        sources = self.sources()
        while len(self._clones) < count:
            i = len(self._clones)
            target = self.workdir / "cast" / f"p{i:02d}"
            clone_bundle(sources[i % len(sources)], target, f"p{i:02d}")
            self._clones.append(Persona.from_dir(target))
        return self._clones[:count]

    def extra_adapter(self) -> tuple[str, Path]:
        """A fresh adapter name and a source adapter directory, for load_adapter timings."""
        self._extra += 1
        source = self.sources()[self._extra % len(self.sources())]
        return f"extra{self._extra:03d}", source / "adapter"

    def build(self, count: int) -> tuple[Any, float, float]:
        """A new TorchEngine with ``count`` personas: (engine, total seconds, base-load
        seconds inside that construction)."""
        import hyperlex.engines.torch.engine as engine_torch

        personas = self.personas(count)
        with timed_base_load() as base_seconds:
            start = time.perf_counter()
            engine = engine_torch.TorchEngine(personas, base=self.config.base, progress=False)
            total = time.perf_counter() - start
        if engine.skipped:
            raise SystemExit("personas not attached: " + "; ".join(engine.skipped.values()))
        return engine, total, base_seconds[0]

    def engine(self, count: int) -> Any:
        if count not in self._engines:
            self._engines[count] = self.build(count)[0]
        return self._engines[count]

    def keep(self, count: int, engine: Any) -> None:
        self._engines[count] = engine

    def release(self) -> None:
        if self._engines:
            self._engines.clear()
            collect()


@contextlib.contextmanager
def timed_base_load() -> Iterator[list[float]]:
    """Time ``load_base`` inside TorchEngine's constructor (the engine module's own name for
    it is wrapped for the duration; core is not changed)."""
    import hyperlex.engines.torch.engine as engine_torch

    seconds = [0.0]
    original = engine_torch.load_base

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - start

    engine_torch.load_base = wrapper
    try:
        yield seconds
    finally:
        engine_torch.load_base = original


def names(personas: Sequence[Any]) -> list[str]:
    return [p.name for p in personas]
