"""Training within a memory budget (issue 20): micro-batches with accumulated gradients give
the whole batch's update, the plan is the fastest that fits, and a run that cannot fit is
refused before it starts."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.errors import HyperlexError
from hyperlex.training.memory import GIB, parse_size, plan_memory
from hyperlex.training.train import TrainConfig, train

from .test_train import bundle  # noqa: F401 - the fixture

SMOLLM2 = SimpleNamespace(num_hidden_layers=30, hidden_size=576, intermediate_size=1536)


def test_micro_batches_give_the_same_adapter_as_whole_batches(
        bundle: Path, tiny_base: Path, tmp_path: Path) -> None:  # noqa: F811
    from safetensors.torch import load_file

    twin = Path(shutil.copytree(bundle, tmp_path / "twin"))
    whole = TrainConfig(r=4, alpha=8, epochs=2, batch_size=4, max_length=256, dropout=0.0,
                        save_dtype="float32", micro_batch_size=4)
    card = train(bundle, whole, base=str(tiny_base), progress=False)
    micro = train(twin, dataclasses.replace(whole, micro_batch_size=1), base=str(tiny_base),
                  progress=False)
    assert card["memory_plan"]["accumulation"] == 1 and micro["memory_plan"]["accumulation"] == 4
    assert micro["first_loss"] == pytest.approx(card["first_loss"], abs=1e-5)
    a = load_file(bundle / "adapter" / "adapter_model.safetensors")
    b = load_file(twin / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key


def test_the_plan_is_the_fastest_that_fits_the_budget() -> None:
    def plan(budget: float):
        return plan_memory(8, 320, SMOLLM2, resident=int(0.5 * GIB), budget=int(budget * GIB))

    roomy = plan(20)
    assert (roomy.micro_batch, roomy.accumulation, roomy.gradient_checkpointing) == (8, 1, False)
    tight = plan(3)
    assert tight.micro_batch * tight.accumulation >= 8 and tight.micro_batch < 8
    assert tight.estimate <= 3 * GIB
    tighter = plan(2)
    assert tighter.gradient_checkpointing and tighter.estimate <= 2 * GIB
    assert "2.0 GiB budget" in tighter.describe()


def test_a_run_that_cannot_fit_is_refused_with_the_numbers() -> None:
    with pytest.raises(HyperlexError, match=r"needs about 1\.\d GiB even with micro-batches of 1 "
                                            r"and gradient checkpointing on, more than the 0\.5 "
                                            r"GiB budget"):
        plan_memory(8, 320, SMOLLM2, resident=int(0.4 * GIB), budget=int(0.5 * GIB))


def test_fixed_settings_are_kept() -> None:
    plan = plan_memory(8, 320, SMOLLM2, resident=0, budget=100 * GIB, micro_batch=2,
                       checkpointing=True)
    assert (plan.micro_batch, plan.accumulation, plan.gradient_checkpointing) == (2, 4, True)


@pytest.mark.parametrize(("text", "size"), [("3G", 3 * GIB), ("2.5GiB", int(2.5 * GIB)),
                                            ("800M", 800 * 2**20), ("1000", 1000)])
def test_sizes_read_as_people_write_them(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_agent_train_refuses_a_budget_too_small_before_training(
        bundle: Path, tiny_base: Path) -> None:  # noqa: F811
    result = CliRunner().invoke(cli, ["train", str(bundle), "--base", str(tiny_base),
                                      "--max-memory", "10M"])
    assert result.exit_code != 0
    assert "more than the 0.0 GiB budget" in result.output and "Raise --max-memory" in \
        result.output
    assert "Traceback" not in result.output
    assert not (bundle / "adapter").exists()
    bad = CliRunner().invoke(cli, ["train", str(bundle), "--max-memory", "lots"])
    assert bad.exit_code != 0 and "--max-memory 'lots'" in bad.output


def test_agent_train_says_what_it_chose(bundle: Path, tiny_base: Path) -> None:  # noqa: F811
    result = CliRunner().invoke(cli, ["train", str(bundle), "--base", str(tiny_base),
                                      "--epochs", "1", "--max-length", "256", "--json"])
    assert result.exit_code == 0, result.output
    assert "memory: micro-batches of" in result.stderr
    card = json.loads(result.stdout)
    assert card["memory_plan"]["budget_bytes"] > card["memory_plan"]["estimate_bytes"]
