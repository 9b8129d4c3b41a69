"""Replay records (`agent data replay`): the base's own text, mixed into a round so that the
adapter stays near the base on plain text."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.training.data import read_dataset
from hyperlex.training.train import TrainConfig, train

from .conftest import write_bundle
from .test_train import EXCHANGES

FAST = TrainConfig(r=4, alpha=8, epochs=6, batch_size=2, learning_rate=5e-3, max_length=256,
                   dropout=0.0)


def base_texts(tiny_base: Path, count: int, seed: int) -> list[str]:
    from hyperlex.engines.models import load_base, resolve_base
    from hyperlex.training.replay import replay_texts

    model, tokenizer = load_base(resolve_base(str(tiny_base)))
    return list(replay_texts(model, tokenizer, count, seed, max_new_tokens=64, min_words=4))


def test_agent_data_replay_writes_plain_records_and_repeats_with_its_seed(
        tmp_path: Path, tiny_base: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        result = CliRunner().invoke(cli, ["data", "replay", "--out", str(out), "--count", "5",
                                          "--batch-size", "2", "--max-tokens", "64",
                                          "--min-words", "4", "--base", str(tiny_base)])
        assert result.exit_code == 0, result.output
        assert f"{out}: 5 records" in result.stderr
        runs.append([e.text for e in read_dataset(out)])
    assert all(e.plain for e in read_dataset(tmp_path / "a.jsonl"))
    assert runs[0] == runs[1] and len(set(runs[0])) == 5


def test_a_plain_record_is_scored_like_plain_text(tmp_path: Path, tiny_base: Path) -> None:
    """Every token after the first is a target, with no chat template around it."""
    from hyperlex.engines.models import load_tokenizer, resolve_base
    from hyperlex.persona.bundle import Persona
    from hyperlex.training.data import Example
    from hyperlex.training.train import encode_example

    tokenizer = load_tokenizer(resolve_base(str(tiny_base)))
    text = "A quick brown fox."
    persona = Persona.from_dir(write_bundle(tmp_path, "p", adapter_seed=None))
    ids, labels = encode_example(tokenizer, persona, Example(human="", text=text, plain=True),
                                 256)
    assert ids == tokenizer(text)["input_ids"]
    assert labels == [-100] + ids[1:]


def test_replay_holds_the_adapter_near_the_base_on_plain_text(tmp_path: Path,
                                                              tiny_base: Path) -> None:
    """The same round with and without the base's own samples mixed in: with them, the
    adapter's perplexity on other base samples is lower (what the real writer keeps of its
    task is measured in docs/verification.md)."""
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.persona.bundle import Persona

    replay = base_texts(tiny_base, 8, seed=0)
    unseen = base_texts(tiny_base, 4, seed=100)
    ratios = {}
    for mixed in (False, True):
        root = write_bundle(tmp_path / str(mixed), "trainee", adapter_seed=None)
        (root / "data").mkdir()
        lines = [json.dumps({"human": h, "text": t}) for h, t in EXCHANGES]
        (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
        (root / "data" / "replay.jsonl").write_text(
            "".join(json.dumps({"plain": t}) + "\n" for t in replay))
        config = dataclasses.replace(FAST, extra_data=("data/replay.jsonl",) if mixed else ())
        train(root, config, base=str(tiny_base), progress=False)
        engine = TorchEngine([Persona.from_dir(root)], base=str(tiny_base))

        def nll(persona: str | None) -> float:
            scored = [engine.text_nll(t, persona) for t in unseen]  # noqa: B023
            return sum(n for n, _ in scored) / sum(c for _, c in scored)

        ratios[mixed] = math.exp(nll("trainee") - nll(None))
    assert ratios[True] < ratios[False]
