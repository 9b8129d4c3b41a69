"""Persona bundle validation: the good bundle, and each kind of bad one with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hyperlex.persona.bundle import BundleError, Persona
from hyperlex.scene.model import Hyperlexeme, Scene

from .conftest import write_bundle


@pytest.fixture
def bundle(tmp_path: Path, tiny_bundles: dict[str, Path]) -> Path:
    return Path(shutil.copytree(tiny_bundles["alpha"], tmp_path / "alpha"))


def rewrite(bundle: Path, old: str, new: str) -> None:
    file = bundle / "persona.yaml"
    text = file.read_text()
    assert old in text
    file.write_text(text.replace(old, new))


def load_error(bundle: Path) -> str:
    with pytest.raises(BundleError) as info:
        Persona.from_dir(bundle)
    return str(info.value)


def test_good_bundle_loads_with_its_adapter(bundle: Path) -> None:
    persona = Persona.from_dir(bundle)
    assert persona.name == "alpha"
    assert persona.title == "The Alpha"
    assert persona.base_model == "tiny-llama"
    assert persona.adapter_dir == (bundle / "adapter").resolve()
    assert persona.keywords == ("alpha",)
    info = persona.adapter_info()
    assert info.rank == 4 and info.size_bytes > 0 and "q_proj" in info.target_modules


def test_contract_renders_slots_and_style(bundle: Path) -> None:
    persona = Persona.from_dir(bundle)
    scene = Scene(hyperlexemes={"h1": Hyperlexeme("h1", "time")}, focus=["h1"])
    system = persona.system_message(scene)
    assert system.startswith("You are The Alpha. Scene: time")
    assert "Be brief." in system
    assert persona.contract.params().temperature == 0


def test_the_scene_in_the_system_message_fits_the_contract_budget(bundle: Path) -> None:
    from hyperlex.scene.model import Delta

    rewrite(bundle, "  style: [Be brief]", "  style: [Be brief]\n  scene_view: all\n"
                                           "  scene_budget: 12")
    persona = Persona.from_dir(bundle)
    words = [f"word{i}" for i in range(40)]
    scene = Scene().apply(Delta([Hyperlexeme(f"h{i}", w) for i, w in enumerate(words)]))
    system = persona.system_message(scene, count_tokens=lambda text: len(text.split()))
    shown = system.split("Scene: ", 1)[1].split("\nStyle:")[0]
    assert 0 < len(shown.split()) <= 12
    full = persona.system_message(scene.apply(Delta()), count_tokens=lambda t: 0)
    assert all(w in full for w in words)


def test_a_mood_bundle_is_a_layer(tmp_path: Path) -> None:
    mood = Persona.from_dir(write_bundle(tmp_path, "gloom", adapter_seed=None,
                                         extra_yaml="kind: mood\n"))
    assert mood.is_mood and mood.kind == "mood"


def test_prompt_only_persona_needs_no_adapter(tmp_path: Path) -> None:
    persona = Persona.from_dir(write_bundle(tmp_path, "plain", adapter_seed=None))
    assert persona.adapter_dir is None and persona.adapter_info() is None


def test_missing_persona_yaml(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "persona.yaml: missing" in load_error(tmp_path / "empty")


def test_invalid_yaml_names_the_line(bundle: Path) -> None:
    (bundle / "persona.yaml").write_text("name: alpha\ndescription: [unclosed\nbase_model: x\n")
    message = load_error(bundle)
    assert "persona.yaml" in message and "line" in message and "invalid YAML" in message


@pytest.mark.parametrize(
    ("old", "new", "field", "problem"),
    [
        ("description: A test persona called alpha.\n", "", "description", "required"),
        ("name: alpha", "name: Alpha Persona", "name", "lowercase"),
        ("title: The Alpha", "titel: The Alpha", "titel", "unknown field"),
        ("Be brief]", "Be brief]\n  scene_veiw: all", "contract.scene_veiw", "unknown field"),
        ("Scene: {scene}", "Scene: {memory}", "contract.system", "unknown slot {memory}"),
        ("temperature: 0,", "temperature: hot,", "contract.generation", "temperature must be"),
        ("temperature: 0,", "temprature: 0,", "contract.generation", "unknown generation option"),
        ("keywords: [alpha]", "keywords: alpha", "routing.keywords", "list of strings"),
        ("adapter: adapter/", "adapter: ../../etc", "adapter", "outside the bundle"),
        ("adapter: adapter/", "adapter: missing/", "adapter", "does not exist"),
        ("adapter: adapter/", "adapter: ''", "adapter", "must not be empty"),
        ("Scene: {scene}", "Scene: {scene", "contract.system", "literal braces"),
        ("name: alpha", "name: alpha\nkind: spirit", "kind", "must be one of persona, mood"),
        ("Be brief]", "Be brief]\n  scene_budget: 0", "contract.scene_budget",
         "positive whole number"),
    ],
)
def test_bad_field_is_named(bundle: Path, old: str, new: str, field: str, problem: str) -> None:
    rewrite(bundle, old, new)
    message = load_error(bundle)
    assert str(bundle / "persona.yaml") in message
    assert field in message and problem in message


def test_scene_view_must_be_known(bundle: Path) -> None:
    rewrite(bundle, "  style: [Be brief]", "  style: [Be brief]\n  scene_view: everything")
    assert "contract.scene_view: must be one of all, focus, none" in load_error(bundle)


def test_pickle_adapter_is_refused(bundle: Path) -> None:
    weights = bundle / "adapter" / "adapter_model.safetensors"
    weights.rename(weights.with_name("adapter_model.bin"))
    message = load_error(bundle)
    assert "refusing pickle adapter weights (adapter_model.bin)" in message


def test_adapter_without_config_is_refused(bundle: Path) -> None:
    (bundle / "adapter" / "adapter_config.json").unlink()
    assert "adapter_config.json: missing" in load_error(bundle)


def test_dora_adapter_is_refused(bundle: Path) -> None:
    config_file = bundle / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    assert "use_dora: DoRA adapters are not supported" in load_error(bundle)


def test_lora_bias_is_refused(bundle: Path) -> None:
    config_file = bundle / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "bias": "all"}))
    assert "bias: LoRA bias is not supported" in load_error(bundle)


def test_symlinked_weights_cannot_escape_the_bundle(bundle: Path, tmp_path: Path) -> None:
    weights = bundle / "adapter" / "adapter_model.safetensors"
    outside = tmp_path / "outside.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    assert "outside the bundle" in load_error(bundle)
