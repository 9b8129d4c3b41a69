"""``agent inspect``: the LoRA/base ratio per layer and token, on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperlex.cli.inspect import inspect as inspect_command
from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.eval.activations import compare, inspect_persona, plot_compare, plot_heatmap
from hyperlex.persona.bundle import Persona

from .conftest import bundles_plugin, install_plugin, write_bundle

TEXT = "What is time? Let us distinguish two senses."
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("plain"), "plain", adapter_seed=None)


@pytest.fixture(scope="module")
def mood_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return write_bundle(tmp_path_factory.mktemp("moods"), "gloom", adapter_seed=7,
                        tiny_base=tiny_base, extra_yaml="kind: mood\n")


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_bundles: dict[str, Path], plain_bundle: Path,
           mood_bundle: Path):
    from hyperlex.engines.torch.engine import TorchEngine

    bundles = [*tiny_bundles.values(), plain_bundle, mood_bundle]
    return TorchEngine([Persona.from_dir(b) for b in bundles], base=str(tiny_base),
                       progress=False)


def all_cells(report) -> list[float]:
    return [v for row in report.cells for cells in row for v in cells]


def test_bare_base_and_prompt_only_persona_measure_zero(engine) -> None:
    for persona in (None, "plain"):
        report = inspect_persona(engine, persona, TEXT)
        assert report.layers == [0, 1]
        assert report.projections == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"]
        assert set(all_cells(report)) == {0.0} and report.mean == 0.0


def test_an_adapter_persona_acts_on_every_layer_projection_and_token(engine) -> None:
    report = inspect_persona(engine, "alpha", TEXT)
    assert all(v > 0 for v in all_cells(report))
    assert all(all(mask) for mask in report.adapted)
    n = len(report.tokens)
    assert len(report.ratio) == 2 and all(len(row) == n for row in report.ratio)
    assert len(report.projection_mean) == 2 and all(len(r) == 7 for r in report.projection_mean)
    # the layer ratio is the mean over the layer's projections, per token
    for layer, row in enumerate(report.ratio):
        for t, value in enumerate(row):
            expected = sum(cells[t] for cells in report.cells[layer]) / 7
            assert value == pytest.approx(expected)
    assert report.mean == pytest.approx(sum(report.layer_mean) / 2)


def test_the_ratio_matches_a_hand_computation_from_the_stored_weights(
        engine, tiny_base: Path, tiny_bundles: dict[str, Path]) -> None:
    """Layer 0's q/k/v input is the RMS-normed embedding, independent of any adapter: rebuild
    it and the LoRA update from the safetensors files themselves, not the engine's modules."""
    import torch
    from safetensors.torch import load_file

    report = inspect_persona(engine, "alpha", TEXT, all_tokens=True)
    assert report.first_token == 0 and len(report.tokens) == report.prompt_tokens
    base = load_file(tiny_base / "model.safetensors")
    lora = load_file(tiny_bundles["alpha"] / "adapter" / "adapter_model.safetensors")
    config = json.loads((tiny_bundles["alpha"] / "adapter" / "adapter_config.json").read_text())
    model_config = json.loads((tiny_base / "config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    ids = torch.tensor(report.token_ids)
    hidden = base["model.embed_tokens.weight"][ids]
    variance = hidden.pow(2).mean(-1, keepdim=True)
    x = hidden * torch.rsqrt(variance + model_config["rms_norm_eps"]) \
        * base["model.layers.0.input_layernorm.weight"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        weight = base[f"model.layers.0.self_attn.{proj}.weight"]
        prefix = f"base_model.model.model.layers.0.self_attn.{proj}"
        a, b = lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"]
        expected = (x @ a.T @ b.T * scaling).norm(dim=-1) / (x @ weight.T).norm(dim=-1)
        measured = report.cells[0][report.projections.index(proj)]
        assert measured == pytest.approx(expected.tolist(), rel=1e-4)
        assert min(measured) > 0.01


def test_the_report_covers_the_text_and_generation_prompt(engine) -> None:
    full = inspect_persona(engine, "alpha", TEXT, all_tokens=True)
    part = inspect_persona(engine, "alpha", TEXT)
    assert "".join(part.tokens).startswith(TEXT)
    assert "".join(part.tokens).endswith("<|im_start|>assistant\n")
    assert part.prompt_tokens == full.prompt_tokens == part.first_token + len(part.tokens)
    assert part.token_ids == full.token_ids[part.first_token:]
    start = part.first_token
    for layer in range(2):
        assert part.ratio[layer] == pytest.approx(full.ratio[layer][start:])
    bare = inspect_persona(engine, "alpha", TEXT, system=False, all_tokens=True)
    assert bare.prompt_tokens < full.prompt_tokens  # the persona's system message is left out


def engine_is_free(engine) -> bool:
    """Whether another thread can take the engine (``activate``) within a few seconds."""
    def take() -> None:
        with engine.activate(None):
            pass

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(timeout=5)
    return not taker.is_alive()


def test_inspecting_leaves_no_hooks_and_generation_unchanged(engine) -> None:
    from hyperlex.generation import GenerationParams

    messages = [{"role": "user", "content": TEXT}]
    params = GenerationParams(temperature=0, max_new_tokens=8)
    before = engine.generate(messages, "beta", params).text
    inspect_persona(engine, "alpha", TEXT)
    for layer in engine.lora_modules:  # torch's own hook registries
        assert not layer.base_layer._forward_hooks
        assert not any(m._forward_hooks for m in layer.lora_B.values())
    assert engine_is_free(engine)
    assert engine.generate(messages, "beta", params).text == before


def test_personas_differ_and_a_mood_is_measured_alone(engine) -> None:
    alpha, beta = compare(engine, ["alpha", "beta"], TEXT)
    assert alpha.persona == "alpha" and beta.persona == "beta"
    assert alpha.tokens == beta.tokens
    gaps = [abs(a - b) for ra, rb in zip(alpha.ratio, beta.ratio, strict=True)
            for a, b in zip(ra, rb, strict=True)]
    assert max(gaps) > 0.1 * alpha.mean
    mood = inspect_persona(engine, "gloom", TEXT)
    assert mood.mean > 0 and mood.prompt_tokens < alpha.prompt_tokens  # no system message


def test_library_errors(engine) -> None:
    with pytest.raises(UnknownPersona, match="unknown persona 'nobody'.*alpha, beta"):
        inspect_persona(engine, "nobody", TEXT)
    with pytest.raises(HyperlexError, match="empty"):
        inspect_persona(engine, "alpha", "  \n")


def test_plots_are_png_files(engine, tmp_path: Path) -> None:
    reports = compare(engine, ["alpha", "beta"], TEXT * 12)  # many tokens: labels thinned
    for path in (plot_heatmap(reports[0], tmp_path / "one.png"),
                 plot_compare(reports, tmp_path / "two.png")):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


# --- the command ---------------------------------------------------------------------------


@pytest.fixture
def tiny_plugin(plugin_site: Path, tiny_bundles: dict[str, Path], plain_bundle: Path,
                monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(plugin_site, "hyperlex-tiny", "hx_tiny",
                   bundles_plugin(tiny_bundles["alpha"], tiny_bundles["beta"], plain_bundle))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-tiny")


def run(tiny_base: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(inspect_command, ["--base", str(tiny_base), *args], input=input)


def test_text_output_shows_layer_bars_and_top_tokens(tiny_plugin, tiny_base: Path) -> None:
    result = run(tiny_base, "-p", "alpha", TEXT)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("alpha: ||LoRA Δ|| / ||base||")
    bars = [line.split() for line in lines[2:4]]
    assert [b[0] for b in bars] == ["0", "1"] and all(set(b[2]) == {"#"} for b in bars)
    assert max(len(b[2]) for b in bars) == 40
    assert lines[4].startswith("top tokens: ") and lines[5].startswith("projections: q_proj")


def test_json_has_the_documented_shapes(tiny_plugin, tiny_base: Path) -> None:
    result = run(tiny_base, "--persona", "alpha", "--json", "-", input=TEXT)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    n, layers, projs = len(data["tokens"]), len(data["layers"]), len(data["projections"])
    assert data["persona"] == "alpha" and data["text"] == TEXT and data["base"] == "tiny-llama"
    assert (layers, projs) == (2, 7) and n == len(data["token_ids"]) == len(data["token_mean"])
    assert [len(row) for row in data["ratio"]] == [n] * layers
    assert [len(row) for row in data["projection_mean"]] == [projs] * layers
    assert [[len(c) for c in row] for row in data["ratio_by_projection"]] == [[n] * projs] * 2
    assert len(data["layer_mean"]) == layers and set(data["projection_summary"]) == set(
        data["projections"])
    assert data["first_token"] + n == data["prompt_tokens"] and data["mean"] > 0


def test_compare_shows_that_the_personas_differ(tiny_plugin, tiny_base: Path,
                                                tmp_path: Path) -> None:
    plot = tmp_path / "out" / "compare.png"
    result = run(tiny_base, "--compare", "alpha,beta", TEXT, "--json", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["persona"] for p in data["personas"]] == ["alpha", "beta"]
    assert data["layer_mean"]["alpha"] != data["layer_mean"]["beta"]
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 1000
    table = run(tiny_base, "--compare", "alpha,beta", TEXT)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[1].split() == ["layer", "alpha", "beta"]
    assert lines[-2].startswith("alpha: strongest layers")


def test_plot_writes_a_heatmap(tiny_plugin, tiny_base: Path, tmp_path: Path) -> None:
    plot = tmp_path / "alpha.png"
    result = run(tiny_base, "-p", "alpha", TEXT, "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 1000
    assert f"Wrote {plot}" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["-p", "nobody", TEXT], "unknown persona 'nobody'; installed personas: alpha, beta, "),
    (["--compare", "alpha,nobody", TEXT], "unknown persona 'nobody'"),
    (["-p", "plain", TEXT], "persona 'plain' has no adapter"),
    (["-p", "alpha", "  "], "TEXT is empty"),
    ([TEXT], "give a persona with -p/--persona"),
    (["--compare", "alpha", TEXT], "--compare needs at least two"),
    (["-p", "alpha", "--compare", "alpha,beta", TEXT], "either --persona or --compare"),
])
def test_user_errors_are_one_line(tiny_plugin, tiny_base: Path, args: list[str],
                                  message: str) -> None:
    result = run(tiny_base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert "Loading" not in result.stderr  # caught before any model loads


def test_runs_as_an_agent_subcommand(tiny_plugin, tiny_base: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperlex.cli import cli

    monkeypatch.setitem(cli.commands, "inspect", inspect_command)  # as hyperlex.cli registers it
    result = CliRunner().invoke(cli, ["inspect", "-p", "alpha", TEXT, "--base", str(tiny_base)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("alpha: ")
    assert "--quantize" in CliRunner().invoke(cli, ["inspect", "--help"]).stdout


def test_importing_the_command_first_works_without_torch() -> None:
    """``hyperlex.cli.inspect`` imported before its package's ``cli`` group (an import cycle
    if the command needed the group at import time) loads neither torch nor the engine."""
    code = ("import sys, hyperlex.cli.inspect; "
            "assert 'torch' not in sys.modules, 'torch'; "
            "assert 'hyperlex.engines.torch.engine' not in sys.modules, 'engine'; "
            "from hyperlex.cli import cli; "
            "assert cli.commands['inspect'] is sys.modules['hyperlex.cli.inspect'].inspect")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_persona_trained_on_another_base_is_a_clear_error(tiny_plugin,
                                                            tiny_base: Path) -> None:
    result = run(tiny_base, "-p", "philosopher", TEXT)  # built in, trained on SmolLM2
    assert result.exit_code == 1, result.output
    assert "was trained on base 'smollm2-135m-instruct'" in result.stderr
    assert "Traceback" not in result.output


# --- the real embedded model ---------------------------------------------------------------


@pytest.mark.real_model
def test_the_philosopher_acts_on_the_real_model(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("real-home")
    monkeypatch.setenv("HYPERLEX_HOME", str(home))
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.host import Host

    engine = TorchEngine([Host().persona("philosopher")], progress=False)
    report = inspect_persona(engine, "philosopher", "What is time?")
    assert report.layers == list(range(30)) and len(report.projections) == 7
    assert "".join(report.tokens).startswith("What is time?")
    assert all(v > 0 for v in all_cells(report))
    assert 1e-3 < report.mean < 1.0  # a persona adjusts the base, it does not replace it
    assert inspect_persona(engine, None, "What is time?").mean == 0.0
