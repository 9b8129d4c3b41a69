"""``agent export vllm``: persona adapters as PEFT folders vLLM serves, and the command."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.cli.export import export
from hyperlex.engines.models import EMBEDDED_HUB_ID, EMBEDDED_NAME
from hyperlex.errors import HyperlexError
from hyperlex.persona.bundle import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Persona
from hyperlex.serve.vllm import MANIFEST, MOOD_REASON, export_vllm, lora_rank_flag

from .conftest import write_bundle

BUILTIN_SPEAKERS = ("dreamer", "interface", "logician", "philosopher", "poet", "scientist",
                    "writer")


@pytest.fixture
def tiny(tiny_bundles: dict[str, Path]) -> dict[str, Persona]:
    return {name: Persona.from_dir(path) for name, path in tiny_bundles.items()}


def bad_persona(tmp_path: Path, good: Persona, name: str, **config_changes: object) -> Persona:
    """``good`` under another name with an edited copy of its adapter (bundle validation would
    refuse these, but a plugin can register Persona objects directly)."""
    assert good.adapter_dir is not None
    adapter = tmp_path / f"{name}-adapter"
    shutil.copytree(good.adapter_dir, adapter)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    config.update(config_changes)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    return dataclasses.replace(good, name=name, adapter_dir=adapter)


def logits(base_dir: Path, adapter_dir: Path, scale: float = 1.0):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                      str(adapter_dir))
    if scale != 1.0:  # what the hyperlex engine does with a bundle's scale
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                module.scaling["default"] *= scale
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 42, 7, 3]])).logits


def test_one_peft_folder_per_persona_with_identical_weights(tmp_path: Path, tiny_base: Path,
                                                            tiny: dict[str, Persona]) -> None:
    from peft import LoraConfig

    out = tmp_path / "out"
    result = export_vllm(out, tiny.values(), base=str(tiny_base))
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta", MANIFEST]
    for name, persona in tiny.items():
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        assert (folder / ADAPTER_WEIGHTS).read_bytes() == \
            (persona.adapter_dir / ADAPTER_WEIGHTS).read_bytes()
        config = LoraConfig.from_pretrained(str(folder))
        assert config.base_model_name_or_path == str(tiny_base.resolve())
        written = json.loads((folder / ADAPTER_CONFIG).read_text())
        original = json.loads((persona.adapter_dir / ADAPTER_CONFIG).read_text())
        assert {k: v for k, v in written.items() if k != "base_model_name_or_path"} == \
            {k: v for k, v in original.items() if k != "base_model_name_or_path"}
    assert result.base == str(tiny_base.resolve())
    assert result.max_lora_rank == 8 and result.max_loras == 2


def test_exported_folder_gives_the_bundles_logits(tmp_path: Path, tiny_base: Path,
                                                  tiny: dict[str, Persona]) -> None:
    import torch

    out = tmp_path / "out"
    export_vllm(out, tiny.values(), base=str(tiny_base), with_base=True)
    alpha = tiny["alpha"]
    # The served base is a copy of the base (weights unchanged); both sides must agree exactly.
    assert (out / "base" / "model.safetensors").read_bytes() == \
        (tiny_base / "model.safetensors").read_bytes()
    assert not [p for p in (out / "base").iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    expected = logits(tiny_base, alpha.adapter_dir)
    assert torch.equal(logits(out / "base", out / "alpha"), expected)
    assert not torch.equal(logits(tiny_base, out / "beta"), expected)
    config = json.loads((out / "alpha" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())


def test_with_base_writes_a_loadable_base_and_uses_its_path(tmp_path: Path, tiny_base: Path,
                                                            tiny: dict[str, Persona]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "out"
    result = export_vllm(out, tiny.values(), base=str(tiny_base), with_base=True)
    base = (out / "base").resolve()
    assert result.command[:3] == ["vllm", "serve", "./base"]
    assert f"cd {out.resolve()} && vllm serve ./base" in result.shell_command()
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert AutoConfig.from_pretrained(base).to_dict()["vocab_size"] == \
        AutoConfig.from_pretrained(tiny_base).to_dict()["vocab_size"]
    # the legacy rope_theta key older transformers (as pinned by vLLM) read, kept consistent
    original = json.loads((tiny_base / "config.json").read_text())
    copied = json.loads((base / "config.json").read_text())
    assert copied["rope_theta"] == original["rope_parameters"]["rope_theta"]


def test_with_base_copies_the_embedded_base(runner: CliRunner, tmp_path: Path, tiny_base: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import hyperlex.serve.vllm

    # stands in for the converted embedded model (converting it takes a while)
    monkeypatch.setattr(hyperlex.serve.vllm, "ensure_embedded", lambda: tiny_base)
    out = tmp_path / "out"
    result = runner.invoke(export, ["vllm", str(out), "-p", "poet", "--with-base"])
    assert result.exit_code == 0, result.output
    base = (out / "base").resolve()
    assert shlex.split(result.stdout.replace("\\\n", ""))[3:6] == ["vllm", "serve", "./base"]
    assert (base / "model.safetensors").read_bytes() == \
        (tiny_base / "model.safetensors").read_bytes()
    assert json.loads((out / "poet" / ADAPTER_CONFIG).read_text())[
        "base_model_name_or_path"] == str(base)


def test_with_base_refuses_a_hub_id(tmp_path: Path, tiny: dict[str, Persona]) -> None:
    remote = dataclasses.replace(tiny["alpha"], base_model="other-model")
    with pytest.raises(HyperlexError, match="hub id"):
        export_vllm(tmp_path / "out", [remote], base="someone/Other-Model", with_base=True)
    assert not (tmp_path / "out").exists()
    result = export_vllm(tmp_path / "out", [remote], base="someone/Other-Model")
    assert result.command[2] == "someone/Other-Model"


def test_a_bundle_scale_is_folded_into_lora_alpha(tmp_path: Path, tiny_base: Path,
                                                  tiny: dict[str, Persona]) -> None:
    import torch

    softer = dataclasses.replace(tiny["alpha"], scale=0.5)
    result = export_vllm(tmp_path / "out", [softer], base=str(tiny_base))
    assert result.manifest()["personas"]["alpha"]["lora_alpha"] == 4  # 8 * 0.5
    assert torch.equal(logits(tiny_base, tmp_path / "out" / "alpha"),
                       logits(tiny_base, softer.adapter_dir, scale=0.5))


def test_cli_prints_the_command_for_the_builtin_personas(runner: CliRunner,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "served"
    result = runner.invoke(export, ["vllm", str(out)])
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.stdout.replace("\\\n", ""))
    manifest = json.loads((out / MANIFEST).read_text())
    assert argv[:3] == ["cd", str(out.resolve()), "&&"]  # the folder can be moved
    argv = argv[3:]
    assert argv == manifest["command"]
    assert argv[:3] == ["vllm", "serve", EMBEDDED_HUB_ID]
    assert argv.count("--lora-modules") == 1
    modules = argv[argv.index("--lora-modules") + 1: argv.index("--max-lora-rank")]
    assert modules == [f"{name}=./{name}" for name in BUILTIN_SPEAKERS]
    assert argv[argv.index("--max-lora-rank") + 1] == "8"  # rank 6 -> vLLM's smallest, 8
    assert argv[argv.index("--max-loras") + 1] == str(len(BUILTIN_SPEAKERS))
    assert argv[argv.index("--served-model-name") + 1] == EMBEDDED_NAME
    assert "--enable-lora" in argv
    # the mood is not served, and says why
    assert manifest["skipped"] == {"melancholic": MOOD_REASON}
    assert not (out / "melancholic").exists()
    assert "melancholic" in result.stderr
    for name in BUILTIN_SPEAKERS:
        assert json.loads((out / name / ADAPTER_CONFIG).read_text())[
            "base_model_name_or_path"] == EMBEDDED_HUB_ID


def test_cli_json_matches_the_written_manifest(runner: CliRunner, tmp_path: Path, tiny_base: Path,
                                               tiny_plugin: str) -> None:
    out = tmp_path / "served"
    result = runner.invoke(export, ["vllm", str(out), "--base", str(tiny_base), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / MANIFEST).read_text())
    assert set(printed["personas"]) == {"alpha", "beta"}
    assert printed["personas"]["alpha"] == {
        "path": "./alpha", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}
    assert printed["served_base_name"] == "tiny-llama"
    # the built-in personas were trained on another base: skipped, with a warning, exit 0
    assert printed["skipped"]["poet"].startswith("base_model: trained on 'smollm2-135m-instruct'")
    assert "skipping persona 'poet': base_model" in result.stderr
    assert printed["skipped"]["melancholic"] == MOOD_REASON


def test_prompt_only_personas_are_served_by_the_base(tmp_path: Path, tiny_base: Path,
                                                     tiny: dict[str, Persona]) -> None:
    plain = Persona.from_dir(write_bundle(tmp_path / "bundles", "plain", adapter_seed=None))
    result = export_vllm(tmp_path / "out", [plain, tiny["alpha"]], base=str(tiny_base))
    assert result.prompt_only == ["plain"]
    assert list(result.adapters) == ["alpha"]
    assert not (tmp_path / "out" / "plain").exists()
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["prompt_only"] == ["plain"]


@pytest.mark.parametrize(("changes", "field"), [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 1024}, "r"),
])
def test_unservable_adapters_are_skipped_or_refused(tmp_path: Path, tiny_base: Path,
                                                    tiny: dict[str, Persona],
                                                    changes: dict[str, object],
                                                    field: str) -> None:
    bad = bad_persona(tmp_path, tiny["alpha"], "bad", **changes)
    warnings: list[str] = []
    # among others: skipped with a warning and listed
    result = export_vllm(tmp_path / "out", [bad, tiny["beta"]], base=str(tiny_base),
                         warn=warnings.append)
    assert list(result.adapters) == ["beta"]
    assert result.skipped["bad"].startswith(f"{field}: ")
    assert warnings and f"persona 'bad': {field}:" in warnings[0]
    assert not (tmp_path / "out" / "bad").exists()
    # named explicitly, or alone: an error naming persona and field, nothing written
    for names, personas in ((["bad", "beta"], [bad, tiny["beta"]]), ([], [bad])):
        with pytest.raises(HyperlexError, match=f"persona 'bad': {field}:"):
            export_vllm(tmp_path / "again", personas, base=str(tiny_base), names=names)
        assert not (tmp_path / "again").exists()


def test_a_pickle_only_adapter_is_refused_without_reading_it(tmp_path: Path, tiny_base: Path,
                                                             tiny: dict[str, Persona]) -> None:
    bad = bad_persona(tmp_path, tiny["alpha"], "pickled")
    (bad.adapter_dir / ADAPTER_WEIGHTS).unlink()
    (bad.adapter_dir / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(HyperlexError, match=r"persona 'pickled': adapter_model\.safetensors: "
                                            r"missing; refusing pickle-only weights"):
        export_vllm(tmp_path / "out", [bad], base=str(tiny_base))


def test_a_stray_tensor_in_the_weights_is_refused(tmp_path: Path, tiny_base: Path,
                                                  tiny: dict[str, Persona]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    bad = bad_persona(tmp_path, tiny["alpha"], "stray")
    weights = load_file(bad.adapter_dir / ADAPTER_WEIGHTS)
    weights["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(weights, bad.adapter_dir / ADAPTER_WEIGHTS)
    with pytest.raises(HyperlexError, match="persona 'stray': adapter_model.safetensors: tensor "
                                            "'base_model.model.lm_head.weight'"):
        export_vllm(tmp_path / "out", [bad], base=str(tiny_base))


def test_moods_and_unknown_names_named_explicitly_are_errors(runner: CliRunner,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(export, ["vllm", str(out), "-p", "melancholic"])
    assert result.exit_code == 1
    assert "'melancholic' is a mood" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(export, ["vllm", str(out), "-p", "poet", "-p", "nobody"])
    assert result.exit_code == 2
    assert "unknown persona 'nobody'" in result.stderr and "philosopher" in result.stderr
    assert not out.exists()
    result = runner.invoke(export, ["vllm", str(out), "-p", "poet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "poet"]
    assert "--max-loras 1" in result.stdout


def test_a_non_empty_directory_needs_force(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "poet").mkdir(parents=True)
    (out / "poet" / "stale.txt").write_text("old")
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(export, ["vllm", str(out), "-p", "poet"])
    assert result.exit_code == 1
    assert "not empty" in result.stderr and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == \
        ["notes.txt", "poet", "poet/stale.txt"]
    result = runner.invoke(export, ["vllm", str(out), "-p", "poet", "--force"])
    assert result.exit_code == 0, result.output
    # what the export writes is replaced; everything else is left alone
    assert sorted(p.name for p in (out / "poet").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_force_never_writes_through_a_symlink_or_over_a_source(tmp_path: Path, tiny_base: Path,
                                                               tiny_bundles: dict[str, Path]
                                                               ) -> None:
    bundles = tmp_path / "bundles"
    shutil.copytree(tiny_bundles["alpha"].parent, bundles)
    alpha = Persona.from_dir(bundles / "alpha")
    before = (bundles / "alpha" / "persona.yaml").read_text()
    with pytest.raises(HyperlexError, match="holds the source"):
        export_vllm(bundles, [alpha], base=str(tiny_base), force=True)
    assert (bundles / "alpha" / "persona.yaml").read_text() == before
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "alpha").symlink_to(outside, target_is_directory=True)
    export_vllm(out, [alpha], base=str(tiny_base), force=True)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert not (out / "alpha").is_symlink()
    assert (out / "alpha" / ADAPTER_WEIGHTS).is_file()


def test_max_lora_rank_is_the_smallest_allowed_value() -> None:
    assert [lora_rank_flag(r) for r in (1, 6, 8, 9, 64, 300, 320, 321, 512)] == \
        [8, 8, 8, 16, 64, 320, 320, 512, 512]
    with pytest.raises(HyperlexError, match="513"):
        lora_rank_flag(513)
