"""`agent train` on the tiny model: loss goes down, the adapter loads, Ctrl-C and --resume,
QLoRA on the CPU, configuration from train.yaml with overrides, refusal of bad data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.cli import cli
from hyperlex.errors import HyperlexError
from hyperlex.persona.bundle import Persona
from hyperlex.training.train import TrainConfig, TrainingInterrupted, load_config, train

from .conftest import write_bundle

EXCHANGES = [("What is time?", "Time is the measure of change."),
             ("What is truth?", "Truth is what holds."),
             ("Who are you?", "A quick brown fox."),
             ("Sing", "A poem about the sea and the moon.")]
FAST = TrainConfig(r=4, alpha=8, epochs=6, batch_size=2, learning_rate=5e-3, max_length=256,
                   dropout=0.0)


@pytest.fixture
def bundle(tmp_path: Path, tiny_base: Path) -> Path:
    root = write_bundle(tmp_path, "trainee", adapter_seed=None)
    (root / "data").mkdir()
    lines = [json.dumps({"human": h, "text": t}) for h, t in EXCHANGES]
    (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "data" / "heldout.jsonl").write_text(lines[0] + "\n")
    (root / "persona.yaml").write_text((root / "persona.yaml").read_text())
    return root


def test_training_lowers_the_loss_and_writes_an_adapter_that_loads(bundle: Path,
                                                                   tiny_base: Path) -> None:
    from hyperlex.engines.torch.engine import TorchEngine

    card = train(bundle, FAST, base=str(tiny_base), progress=False)
    assert card["final_loss"] < card["first_loss"]
    assert card["heldout_loss"] is not None and card["peak_memory_mb"] > 0
    assert card["data"]["records"] == 4 and len(card["data"]["sha256"]) == 64
    assert card["base_model"] == "tiny-llama" and card["config"]["r"] == 4
    persona = Persona.from_dir(bundle)  # the prompt-only bundle now declares its adapter
    assert persona.adapter_info().rank == 4
    saved = json.loads((bundle / "adapter" / "training_card.json").read_text())
    assert saved["final_loss"] == card["final_loss"]
    engine = TorchEngine([persona], base=str(tiny_base))
    assert engine.generate([{"role": "user", "content": "What is time?"}], "trainee").text


def test_adapter_is_stored_in_the_configured_dtype(bundle: Path, tiny_base: Path) -> None:
    from safetensors import safe_open

    train(bundle, TrainConfig(r=2, epochs=1, batch_size=4, max_length=256,
                              save_dtype="bfloat16"), base=str(tiny_base), progress=False)
    with safe_open(bundle / "adapter" / "adapter_model.safetensors", "pt") as weights:
        dtypes = {str(weights.get_tensor(k).dtype) for k in weights.keys()}  # noqa: SIM118
    assert dtypes == {"torch.bfloat16"}


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
        bundle: Path, tiny_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    twin = Path(shutil.copytree(bundle, tmp_path / "twin"))
    config = TrainConfig(r=4, alpha=8, epochs=3, batch_size=2, max_length=256, dropout=0.0,
                         save_dtype="float32")
    train(twin, config, base=str(tiny_base), progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="interrupted at step 3/6"):
        train(bundle, config, base=str(tiny_base), progress=False, on_step=interrupt)
    assert (bundle / ".checkpoint" / "state.pt").is_file()
    assert not (bundle / "adapter").exists()
    card = train(bundle, config, base=str(tiny_base), progress=False, resume=True)
    assert card["steps"] == 6 and not (bundle / ".checkpoint").exists()
    resumed = load_file(bundle / "adapter" / "adapter_model.safetensors")
    straight = load_file(twin / "adapter" / "adapter_model.safetensors")
    for key, tensor in straight.items():
        assert (resumed[key] - tensor).abs().max() < 1e-5, key


def test_resume_refuses_a_checkpoint_from_another_configuration(bundle: Path,
                                                                tiny_base: Path) -> None:
    config = TrainConfig(r=4, epochs=2, batch_size=2, max_length=256)

    def interrupt(step: int, loss: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(bundle, config, base=str(tiny_base), progress=False, on_step=interrupt)
    with pytest.raises(HyperlexError, match="another configuration or dataset"):
        train(bundle, TrainConfig(r=8, epochs=2, batch_size=2, max_length=256),
              base=str(tiny_base), progress=False, resume=True)


def test_qlora_trains_on_the_cpu(bundle: Path, tiny_base: Path) -> None:
    card = train(bundle, TrainConfig(r=4, alpha=8, epochs=2, batch_size=2, max_length=256,
                                     qlora=True, learning_rate=5e-3), base=str(tiny_base),
                 progress=False)
    assert card["config"]["qlora"] and card["final_loss"] < card["first_loss"]
    assert Persona.from_dir(bundle).adapter_info().rank == 4


@pytest.mark.parametrize("qlora", [False, True])
def test_gradient_checkpointing_trains_the_same_adapter(bundle: Path, tiny_base: Path,
                                                        tmp_path: Path, qlora: bool) -> None:
    """Recomputing activations in the backward pass changes memory, not the result."""
    from safetensors.torch import load_file

    twin = Path(shutil.copytree(bundle, tmp_path / "twin"))
    config = TrainConfig(r=4, alpha=8, epochs=1, batch_size=2, max_length=256, dropout=0.0,
                         save_dtype="float32", qlora=qlora)
    plain = train(bundle, config, base=str(tiny_base), progress=False)
    checkpointed = train(twin, TrainConfig(**{**config.__dict__, "gradient_checkpointing": True}),
                         base=str(tiny_base), progress=False)
    assert checkpointed["config"]["gradient_checkpointing"] is True
    assert abs(checkpointed["final_loss"] - plain["final_loss"]) < 1e-4
    ours = load_file(twin / "adapter" / "adapter_model.safetensors")
    for key, tensor in load_file(bundle / "adapter" / "adapter_model.safetensors").items():
        assert (ours[key] - tensor).abs().max() < 1e-4, key


def test_data_paths_must_stay_inside_the_bundle(bundle: Path, tiny_base: Path) -> None:
    for key in ("data", "heldout"):
        with pytest.raises(HyperlexError, match=f"{key}: '../elsewhere.jsonl' points outside"):
            train(bundle, TrainConfig(**{**FAST.__dict__, key: "../elsewhere.jsonl"}),
                  base=str(tiny_base), progress=False)


def test_train_yaml_is_read_and_overridden(bundle: Path) -> None:
    (bundle / "train.yaml").write_text("r: 8\nepochs: 2\ntarget_modules: [q_proj, v_proj]\n")
    config = load_config(bundle, {"epochs": 5, "alpha": None})
    assert (config.r, config.epochs, config.target_modules) == (8, 5, ("q_proj", "v_proj"))
    (bundle / "train.yaml").write_text("rank: 8\n")
    with pytest.raises(HyperlexError, match="train.yaml: unknown training option 'rank'"):
        load_config(bundle)
    (bundle / "train.yaml").write_text("dropout: 2\n")
    with pytest.raises(HyperlexError, match=r"dropout must be in \[0, 1\)"):
        load_config(bundle)


def test_agent_train_refuses_bad_data_with_line_numbers(bundle: Path, tiny_base: Path) -> None:
    with (bundle / "data" / "train.jsonl").open("a") as data:
        data.write('{"human": "oops"}\n')
    result = CliRunner().invoke(cli, ["train", str(bundle), "--base", str(tiny_base),
                                      "--epochs", "1"])
    assert result.exit_code == 1
    assert "train.jsonl:5: text is missing" in result.stderr
    assert not (bundle / "adapter").exists()


def test_agent_train_cli_trains_with_overrides(bundle: Path, tiny_base: Path) -> None:
    result = CliRunner().invoke(cli, ["train", str(bundle), "--base", str(tiny_base), "--r", "2",
                                      "--epochs", "1", "--batch-size", "4",
                                      "--target-modules", "q_proj,v_proj", "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert card["config"]["r"] == 2 and card["config"]["target_modules"] == ["q_proj", "v_proj"]
    further = CliRunner().invoke(cli, ["train", str(bundle), "--base", str(tiny_base), "--r", "2",
                                       "--epochs", "1", "--target-modules", "q_proj,v_proj",
                                       "--init-adapter", "adapter/", "--anchor-adapter",
                                       "adapter/", "--anchor-weight", "2", "--json"])
    assert further.exit_code == 0, further.output
    anchored = json.loads(further.stdout)["anchor"]
    assert (anchored["adapter"], anchored["weight"], anchored["round"]) == ("adapter/", 2.0, 1)


def test_base_model_mismatch_is_refused(bundle: Path, tmp_path: Path, tiny_base: Path) -> None:
    text = (bundle / "persona.yaml").read_text().replace("base_model: tiny-llama",
                                                         "base_model: other")
    (bundle / "persona.yaml").write_text(text)
    with pytest.raises(HyperlexError, match="base_model is 'other' but training would use"):
        train(bundle, FAST, base=str(tiny_base), progress=False)


def test_records_cut_off_by_max_length_are_refused(bundle: Path, tiny_base: Path) -> None:
    with pytest.raises(HyperlexError, match=r"4 record\(s\) have no reply tokens within "
                                            r"max_length=8 \(lines 1, 2, 3, 4\)"):
        train(bundle, TrainConfig(max_length=8), base=str(tiny_base), progress=False)


def test_a_real_ctrl_c_stops_after_the_current_step(bundle: Path, tiny_base: Path) -> None:
    import os
    import signal

    def press_ctrl_c(step: int, loss: float) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="interrupted at step 2/"):
        train(bundle, TrainConfig(r=2, epochs=2, batch_size=2, max_length=256),
              base=str(tiny_base), progress=False, on_step=press_ctrl_c)
    assert (bundle / ".checkpoint" / "state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_declared_adapter_folder_is_where_the_adapter_goes(bundle: Path,
                                                            tiny_base: Path) -> None:
    yaml_file = bundle / "persona.yaml"
    yaml_file.write_text(yaml_file.read_text() + "adapter: weights/\n")
    train(bundle, TrainConfig(r=2, epochs=1, batch_size=4, max_length=256), base=str(tiny_base),
          progress=False)
    assert Persona.from_dir(bundle).adapter_dir == (bundle / "weights").resolve()
    assert not (bundle / "adapter").exists()


def test_a_further_round_starts_from_the_adapter_and_mixes_in_more_data(
        bundle: Path, tiny_base: Path) -> None:
    import dataclasses

    first = train(bundle, FAST, base=str(tiny_base), progress=False)
    record = {"speak_scene": True, "text": "The fox does not see the moon.",
              "scene": {"hyperlexemes": [{"id": "fox", "label": "fox"},
                                         {"id": "moon", "label": "moon"}],
                        "links": [{"src": "fox", "rel": "see", "dst": "moon", "polarity": -1}]}}
    (bundle / "data" / "faithful.jsonl").write_text(json.dumps(record) + "\n")
    further = dataclasses.replace(FAST, epochs=1, extra_data=("data/faithful.jsonl",),
                                  init_adapter="adapter/")
    card = train(bundle, further, base=str(tiny_base), progress=False)
    assert card["round"] == 2 and card["init_adapter"] == "adapter/"
    assert [(m["file"], m["records"]) for m in card["data"]["mix"]] == [
        ("data/train.jsonl", 4), ("data/faithful.jsonl", 1)]
    assert card["earlier_rounds"] == [{k: first[k] for k in (
        "round", "data", "steps", "final_loss", "heldout_loss")}]
    assert card["first_loss"] < first["first_loss"]  # it starts where round 1 ended


def test_an_initial_adapter_of_another_shape_is_refused(bundle: Path, tiny_base: Path) -> None:
    import dataclasses

    train(bundle, FAST, base=str(tiny_base), progress=False)
    wider = dataclasses.replace(FAST, r=8, init_adapter="adapter/")
    with pytest.raises(HyperlexError, match="init_adapter: .* match r, alpha"):
        train(bundle, wider, base=str(tiny_base), progress=False)
    outside = dataclasses.replace(FAST, init_adapter="../elsewhere")
    with pytest.raises(HyperlexError, match="outside the bundle"):
        train(bundle, outside, base=str(tiny_base), progress=False)


def _distance_from(weights: dict, bundle: Path) -> float:
    from safetensors.torch import load_file

    now = load_file(bundle / "adapter" / "adapter_model.safetensors")
    return sum(float((now[k].float() - weights[k].float()).norm()) for k in weights)


def test_an_anchored_round_stays_nearer_its_anchor(bundle: Path, tiny_base: Path,
                                                   tmp_path: Path) -> None:
    import dataclasses

    from safetensors.torch import load_file

    train(bundle, dataclasses.replace(FAST, save_dtype="float32"), base=str(tiny_base),
          progress=False)
    start = load_file(bundle / "adapter" / "adapter_model.safetensors")
    lines = [json.dumps({"human": h, "text": "Nothing but the wind."}) for h, _ in EXCHANGES]
    (bundle / "data" / "turn.jsonl").write_text("\n".join(lines) + "\n")
    twin = Path(shutil.copytree(bundle, tmp_path / "twin"))
    further = dataclasses.replace(FAST, data="data/turn.jsonl", init_adapter="adapter/",
                                  save_dtype="float32")
    free = train(bundle, further, base=str(tiny_base), progress=False)
    held = train(twin, dataclasses.replace(further, anchor_adapter="adapter/",
                                           anchor_weight=100.0),  # a heavy anchor
                 base=str(tiny_base), progress=False)
    assert "anchor" not in free
    assert held["anchor"]["adapter"] == "adapter/" and held["anchor"]["round"] == 1
    assert held["anchor"]["first_kl"] == pytest.approx(0.0, abs=1e-5)  # starts at its anchor
    assert held["anchor"]["final_kl"] > 0
    assert held["first_loss"] == pytest.approx(free["first_loss"], abs=1e-5)
    assert held["final_loss"] > free["final_loss"]  # the new replies pull less ...
    assert held["heldout_loss"] < free["heldout_loss"]  # ... and the old voice stays
    assert _distance_from(start, twin) < _distance_from(start, bundle)


def test_an_anchored_round_resumes_exactly(bundle: Path, tiny_base: Path, tmp_path: Path) -> None:
    import dataclasses

    from safetensors.torch import load_file

    train(bundle, FAST, base=str(tiny_base), progress=False)
    twin = Path(shutil.copytree(bundle, tmp_path / "twin"))
    config = dataclasses.replace(FAST, epochs=2, init_adapter="adapter/", save_dtype="float32",
                                 anchor_adapter="adapter/")
    straight = train(twin, config, base=str(tiny_base), progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(bundle, config, base=str(tiny_base), progress=False, on_step=interrupt)
    resumed = train(bundle, config, base=str(tiny_base), progress=False, resume=True)
    assert resumed["anchor"]["final_kl"] == pytest.approx(straight["anchor"]["final_kl"],
                                                          abs=1e-6)
    a = load_file(bundle / "adapter" / "adapter_model.safetensors")
    b = load_file(twin / "adapter" / "adapter_model.safetensors")
    for key, tensor in b.items():
        assert (a[key] - tensor).abs().max() < 1e-5, key


def test_records_the_anchor_does_not_hold_train_as_without_it(bundle: Path, tiny_base: Path,
                                                              tmp_path: Path) -> None:
    import dataclasses

    from safetensors.torch import load_file

    train(bundle, FAST, base=str(tiny_base), progress=False)
    lines = [json.dumps({"human": h, "text": "Nothing but the wind."}) for h, _ in EXCHANGES]
    (bundle / "data" / "turn.jsonl").write_text("\n".join(lines) + "\n")
    twin, third = (Path(shutil.copytree(bundle, tmp_path / name)) for name in ("twin", "third"))
    further = dataclasses.replace(FAST, epochs=2, extra_data=("data/turn.jsonl",),
                                  init_adapter="adapter/", save_dtype="float32")
    mixed = train(third, dataclasses.replace(further, anchor_adapter="adapter/",
                                             unanchored_data=("data/turn.jsonl",)),
                  base=str(tiny_base), progress=False)
    assert mixed["anchor"]["unanchored_data"] == ["data/turn.jsonl"]
    assert mixed["anchor"]["final_kl"] > 0  # the voice records are held
    free = train(bundle, dataclasses.replace(further, data="data/turn.jsonl", extra_data=()),
                 base=str(tiny_base), progress=False)
    unheld = train(twin, dataclasses.replace(further, data="data/turn.jsonl", extra_data=(),
                                             anchor_adapter="adapter/", anchor_weight=100.0,
                                             unanchored_data=("data/turn.jsonl",)),
                   base=str(tiny_base), progress=False)
    assert unheld["anchor"]["final_kl"] == pytest.approx(0.0, abs=1e-6)
    assert unheld["final_loss"] == pytest.approx(free["final_loss"], abs=1e-5)
    a = load_file(bundle / "adapter" / "adapter_model.safetensors")
    b = load_file(twin / "adapter" / "adapter_model.safetensors")
    for key, tensor in a.items():
        assert (b[key] - tensor).abs().max() < 1e-5, key


def test_a_missing_or_misshapen_anchor_is_refused(bundle: Path, tiny_base: Path) -> None:
    import dataclasses

    with pytest.raises(HyperlexError, match="anchor_adapter: .* has no adapter_config.json"):
        train(bundle, dataclasses.replace(FAST, anchor_adapter="adapter/"), base=str(tiny_base),
              progress=False)
    train(bundle, FAST, base=str(tiny_base), progress=False)
    with pytest.raises(HyperlexError, match="anchor_adapter: .* match r, alpha"):
        train(bundle, dataclasses.replace(FAST, r=8, anchor_adapter="adapter/"),
              base=str(tiny_base), progress=False)
    with pytest.raises(HyperlexError, match=r"unanchored_data: data/new.jsonl is not among the "
                                            r"training files \(data/train.jsonl\)"):
        train(bundle, dataclasses.replace(FAST, anchor_adapter="adapter/",
                                          unanchored_data=("data/new.jsonl",)),
              base=str(tiny_base), progress=False)
    with pytest.raises(HyperlexError, match="no anchor_adapter"):
        train(bundle, dataclasses.replace(FAST, unanchored_data=("data/train.jsonl",)),
              base=str(tiny_base), progress=False)
    with pytest.raises(HyperlexError, match="anchor_weight must be > 0"):
        load_config(bundle, {"anchor_weight": 0})
