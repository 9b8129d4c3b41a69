"""Adapter scale (the bundle's ``scale`` field, ``TorchEngine.set_scale``) and
``agent eval calibrate``, on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.preprocessing import FunctionTransformer

from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.eval.calibrate import (
    ScalePoint,
    calibrate,
    check_writable,
    parse_scales,
    recommend,
    write_scale,
)
from hyperlex.eval.fidelity import evaluation_params, persona_messages
from hyperlex.persona.bundle import BundleError, Persona
from hyperlex.training.data import Example

from .conftest import bundles_plugin, install_plugin, write_bundle

MESSAGES = [{"role": "system", "content": "You are a test."},
            {"role": "user", "content": "What is time?"}]
QUESTIONS = ["What is time?", "Tell me about the sea.", "Why is the sky blue?",
             "What is a poem?", "How do I boil an egg?", "Who are you?"]
REFERENCES = {"alpha": ["The sea is wide and blue.", "Moonlight on the water."],
              "beta": ["Two plus two is four.", "Solve for x, then check."]}
PARAMS = evaluation_params(8)


def minimal(**fields: object) -> dict[str, object]:
    return {"name": "stoic", "description": "d", "base_model": "tiny",
            "contract": {"system": "You are {persona}."}, **fields}


# the bundle field ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -1, 2.5, "high", True, None, float("nan"), [1]])
def test_a_scale_outside_0_to_2_is_a_bundle_error_naming_the_field(value: object) -> None:
    with pytest.raises(BundleError) as caught:
        Persona.from_mapping(minimal(scale=value), file="/b/persona.yaml")
    assert caught.value.field == "scale"
    assert str(caught.value) == f"/b/persona.yaml: scale: must be a number in (0, 2], got {value!r}"


def test_a_scale_defaults_to_one_and_accepts_whole_numbers() -> None:
    assert Persona.from_mapping(minimal()).scale == 1.0
    assert Persona.from_mapping(minimal(scale=2)).scale == 2.0
    assert Persona.from_mapping(minimal(scale=0.25)).scale == 0.25


# the engine ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def halved(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The alpha persona's very adapter (same seed), with ``scale: 0.5`` in its bundle."""
    return write_bundle(tmp_path_factory.mktemp("halved"), "alpha", adapter_seed=1,
                        tiny_base=tiny_base, extra_yaml="scale: 0.5\n")


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_bundles: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory):
    from hyperlex.engines.torch.engine import TorchEngine

    root = tmp_path_factory.mktemp("cast")
    gloom = write_bundle(root, "gloom", adapter_seed=7, tiny_base=tiny_base,
                         extra_yaml="kind: mood\n")
    plain = write_bundle(root, "plain", adapter_seed=None)
    bundles = [*tiny_bundles.values(), gloom, plain]
    return TorchEngine([Persona.from_dir(b) for b in bundles], base=str(tiny_base),
                       progress=False)


def peft_logits(tiny_base: Path, adapter: Path, scale: float | None):
    """Logits of MESSAGES through plain PEFT with ``alpha`` scaled by its own ``set_scale``
    (``None``: the bare base)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    if scale is not None:
        model = PeftModel.from_pretrained(model, str(adapter), adapter_name="alpha")
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale("alpha", scale)
    with torch.no_grad():
        return model(**inputs).logits


def engine_logits(engine, persona: str | None, layers=()):
    import torch

    with torch.no_grad(), engine.activate(persona, layers) as model:
        return model(**engine.encode(MESSAGES)).logits


def test_the_bundle_scale_is_applied_at_load_like_peft_scaling(
        tiny_base: Path, halved: Path, tiny_bundles: dict[str, Path]) -> None:
    import torch

    from hyperlex.engines.torch.engine import TorchEngine

    persona = Persona.from_dir(halved)
    assert persona.scale == 0.5
    engine = TorchEngine([persona], base=str(tiny_base), progress=False)
    assert engine.scales == {"alpha": 0.5}
    ours = engine_logits(engine, "alpha")
    adapter = halved / "adapter"
    torch.testing.assert_close(ours, peft_logits(tiny_base, adapter, 0.5))
    full, bare = peft_logits(tiny_base, adapter, 1.0), peft_logits(tiny_base, adapter, None)
    assert not torch.allclose(ours, full, atol=1e-4)
    assert not torch.allclose(ours, bare, atol=1e-4)
    # every LoRA layer of the adapter carries half of PEFT's alpha / r
    layer = next(layer for layer in engine.lora_modules if "alpha" in layer.scaling)
    assert layer.scaling["alpha"] == pytest.approx(0.5 * layer.lora_alpha["alpha"]
                                                   / layer.r["alpha"])
    # PEFT's per-row adapter_names path (mixed batches) sees the scale the engine's own
    # switch sets (each turn alone)
    other = [{"role": "user", "content": "Tell me about the sea."}]
    requests = [(MESSAGES, "alpha"), (other, "alpha")]
    per_row = [c.text for c in engine.generate_batch([*requests, (other, None)], PARAMS)]
    switched = [engine.generate(messages, persona, PARAMS).text for messages, persona in requests]
    assert per_row[:2] == switched and per_row[1] != per_row[2]
    unscaled = TorchEngine([Persona.from_dir(tiny_bundles["alpha"])], base=str(tiny_base),
                           progress=False)
    torch.testing.assert_close(engine_logits(unscaled, "alpha"), full)


def test_set_scale_holds_across_switches_and_scale_one_restores_the_adapter(
        engine, tiny_base: Path, tiny_bundles: dict[str, Path]) -> None:
    import torch

    adapter = tiny_bundles["alpha"] / "adapter"
    original = engine_logits(engine, "alpha")
    try:
        engine.set_scale("alpha", 1.5)
        assert engine.scales["alpha"] == 1.5
        scaled = engine_logits(engine, "alpha")
        torch.testing.assert_close(scaled, peft_logits(tiny_base, adapter, 1.5))
        for other, layers in (("beta", ()), (None, ()), ("beta", [("gloom", 0.7)]),
                              ("alpha", [("gloom", 1.0)])):
            engine_logits(engine, other, layers)
        torch.testing.assert_close(engine_logits(engine, "alpha"), scaled)
        assert engine.generate(MESSAGES, "alpha", PARAMS).text == \
            engine.generate(MESSAGES, "alpha", PARAMS).text
    finally:
        engine.set_scale("alpha", 1.0)
    torch.testing.assert_close(engine_logits(engine, "alpha"), original)


def test_a_moods_scale_composes_with_its_weight(engine) -> None:
    import torch

    half_weight = engine_logits(engine, "alpha", [("gloom", 0.5)])
    try:
        engine.set_scale("gloom", 0.5)  # while the mood is active at 0.5: re-applied next time
        torch.testing.assert_close(engine_logits(engine, "alpha", [("gloom", 1.0)]),
                                   half_weight)
        quarter = engine_logits(engine, "alpha", [("gloom", 0.5)])
        assert not torch.allclose(quarter, half_weight, atol=1e-4)
    finally:
        engine.set_scale("gloom", 1.0)
    torch.testing.assert_close(engine_logits(engine, "alpha", [("gloom", 0.5)]), half_weight)


def test_set_scale_refuses_what_it_cannot_scale(engine) -> None:
    with pytest.raises(UnknownPersona, match="unknown persona 'nobody'"):
        engine.set_scale("nobody", 1.0)
    with pytest.raises(HyperlexError, match="'plain' has no adapter to scale"):
        engine.set_scale("plain", 1.0)
    with pytest.raises(HyperlexError, match=r"scale of 'alpha': must be a number in \(0, 2\]"):
        engine.set_scale("alpha", 0)
    assert engine.scales["alpha"] == 1.0


# the recommendation rule ---------------------------------------------------------------------

def point(scale: float, hits: int, ppl: float, nll: float = 3.0) -> ScalePoint:
    return ScalePoint(scale, hits, 6, nll, ppl)


def test_recommend_takes_the_best_fidelity_within_the_perplexity_bound() -> None:
    points = [point(0.5, 2, 0.9), point(1.0, 4, 1.0), point(1.25, 5, 1.08), point(1.5, 6, 1.2)]
    assert recommend(points) == (1.25, True)  # 1.5 is better but breaks the 10% bound
    assert recommend(points, bound=1.5) == (1.5, True)


def test_recommend_breaks_ties_towards_one_then_lower_nll() -> None:
    assert recommend([point(0.5, 4, 1.0), point(1.5, 4, 1.0), point(0.75, 4, 1.0)]) == \
        (0.75, True)
    assert recommend([point(0.75, 4, 1.0, nll=3.2), point(1.25, 4, 1.0, nll=3.1)]) == \
        (1.25, True)


def test_when_no_scale_is_within_the_bound_the_lowest_perplexity_one_is_pointed_at() -> None:
    points = [point(0.5, 1, 1.12), point(1.0, 5, 1.3), point(1.5, 6, 1.6)]
    assert recommend(points) == (0.5, False)


def test_parse_scales() -> None:
    assert parse_scales("1.5, 0.5,1,1.0,") == (0.5, 1.0, 1.5)
    for bad, problem in (("0,1", "scale must be a number in (0, 2], got 0.0"),
                         ("1,x", "'x' is not a number"), (" , ", "at least one scale")):
        with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            parse_scales(bad)


# the sweep -----------------------------------------------------------------------------------

def planted_features(marked: set[str]) -> FunctionTransformer:
    """Deterministic stand-in features for the classifier: alpha's references and the
    ``marked`` replies land on one point, everything else on another."""
    def features(texts: list[str]) -> np.ndarray:
        return np.array([[1.0, 0.0] if t in marked or t in REFERENCES["alpha"] else [0.0, 1.0]
                         for t in texts])
    return FunctionTransformer(features)


def heldout() -> list[Example]:
    return [Example(human=q, text=REFERENCES["alpha"][i % 2]) for i, q in enumerate(QUESTIONS)]


def replies_at(engine, persona: Persona, scale: float) -> list[str]:
    engine.set_scale(persona.name, scale)
    try:
        requests = [(persona_messages(persona, e, engine), persona.name) for e in heldout()]
        return [c.text.strip() for c in engine.generate_batch(requests, PARAMS)]
    finally:
        engine.set_scale(persona.name, 1.0)


def test_the_sweep_recommends_the_scale_whose_replies_are_recognised(engine) -> None:
    persona = engine.personas["alpha"]
    scales = (0.5, 0.75, 1.0, 1.5)
    replies = {s: replies_at(engine, persona, s) for s in scales}
    others = {r for s in scales if s != 0.75 for r in replies[s]}
    marked = set(replies[0.75]) - others
    assert marked, "the scales should change at least one greedy reply"
    messages: list[str] = []
    report = calibrate(engine, persona, heldout(), REFERENCES, scales=scales,
                       features=planted_features(marked), params=PARAMS, bound=math.inf,
                       batch_size=4, progress=messages.append)
    assert [p.scale for p in report.points] == list(scales)
    hits = {p.scale: p.hits for p in report.points}
    assert hits == {0.5: 0, 0.75: sum(r in marked for r in replies[0.75]), 1.0: 0, 1.5: 0}
    assert (report.recommended, report.qualified) == (0.75, True)
    assert all(p.replies == 6 and p.nll > 0 and p.ppl_ratio > 0 for p in report.points)
    assert engine.scales["alpha"] == 1.0  # restored
    assert "| 0.75 |" in report.table() and "**recommended**" in report.table()
    assert any("scale 0.75: fidelity" in m for m in messages)
    data = json.loads(json.dumps(report.as_dict()))
    assert data["recommended"] == 0.75 and len(data["points"]) == 4
    assert data["samples"]["0.75"][0]["reply"] == replies[0.75][0]


def test_the_sweep_says_when_no_scale_keeps_perplexity_within_the_bound(engine) -> None:
    persona = engine.personas["alpha"]
    report = calibrate(engine, persona, heldout(), REFERENCES, scales=(0.5, 1.0),
                       features=planted_features(set()), params=PARAMS, limit=2, bound=0.01)
    assert not report.qualified
    lowest = min(report.points, key=lambda p: p.ppl_ratio)
    assert report.recommended == lowest.scale
    assert all(p.replies == 2 for p in report.points)
    assert "no scale keeps neutral perplexity at most 0.01x" in report.table()
    assert engine.scales["alpha"] == 1.0


def test_the_sweep_needs_an_attached_adapter_and_two_personas(engine) -> None:
    with pytest.raises(HyperlexError, match="'plain' has no adapter to scale"):
        calibrate(engine, engine.personas["plain"], heldout(), {**REFERENCES, "plain": ["x"]},
                  features=planted_features(set()))
    with pytest.raises(HyperlexError, match="at least one other persona"):
        calibrate(engine, engine.personas["alpha"], heldout(),
                  {"alpha": REFERENCES["alpha"]}, features=planted_features(set()))


# writing the scale into the bundle -----------------------------------------------------------

def test_write_scale_replaces_or_appends_the_line_and_keeps_the_rest(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, "stoic", adapter_seed=None)
    file = bundle / "persona.yaml"
    before = file.read_text()
    assert write_scale(Persona.from_dir(bundle), 0.75) == \
        "scale: 0.75  # set by agent eval calibrate"
    assert file.read_text() == before + "scale: 0.75  # set by agent eval calibrate\n"
    write_scale(Persona.from_dir(bundle), 1.25)
    assert file.read_text() == before + "scale: 1.25  # set by agent eval calibrate\n"
    assert Persona.from_dir(bundle).scale == 1.25


def test_write_scale_refuses_object_bundles_and_read_only_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HyperlexError, match="'stoic' is not a directory bundle"):
        check_writable(Persona.from_mapping(minimal()))
    bundle = write_bundle(tmp_path, "stoic", adapter_seed=None)
    monkeypatch.setattr("hyperlex.eval.calibrate.os.access", lambda path, mode: False)
    with pytest.raises(HyperlexError, match=r"persona.yaml: not writable; add the line"):
        write_scale(Persona.from_dir(bundle), 0.5)


# the command ---------------------------------------------------------------------------------

@pytest.fixture
def calibrate_cli(plugin_site: Path, tiny_base: Path, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch):
    """``agent eval calibrate`` over two fresh tiny bundles with data, the planted features in
    place of the classifier's; returns a runner function and the bundles."""
    import hyperlex.eval.fidelity as fidelity
    from hyperlex.cli import cli, eval_group
    from hyperlex.cli.calibrate import calibrate as command

    bundles = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        bundle = write_bundle(tmp_path / "bundles", name, adapter_seed=seed, tiny_base=tiny_base)
        lines = [json.dumps({"human": q, "text": REFERENCES[name][i % 2]})
                 for i, q in enumerate(QUESTIONS)]
        (bundle / "data").mkdir()
        (bundle / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
        (bundle / "data" / "heldout.jsonl").write_text("\n".join(lines[:3]) + "\n")
        bundles[name] = bundle
    install_plugin(plugin_site, "hyperlex-cal", "hx_cal", bundles_plugin(*bundles.values()))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-cal")
    monkeypatch.setattr(fidelity, "style_features", lambda: planted_features(set()))
    monkeypatch.setitem(eval_group.commands, "calibrate", command)  # as hyperlex.cli does

    def run(*args: str):
        return CliRunner().invoke(cli, ["eval", "calibrate", "--base", str(tiny_base),
                                        "--max-new-tokens", "6", *args])
    return run, bundles


def test_calibrate_command_prints_the_table_and_writes_the_scale(calibrate_cli) -> None:
    run, bundles = calibrate_cli
    file = bundles["alpha"] / "persona.yaml"
    before = file.read_text()
    result = run("-p", "alpha", "--scales", "0.5,1", "--max-ppl-ratio", "100", "--write")
    assert result.exit_code == 0, result.output
    assert "| 0.5 |" in result.stdout and "| 1 |" in result.stdout
    assert "recommended scale" in result.stdout
    # nothing is recognised (planted features): the tie goes to the scale closest to 1
    assert file.read_text() == before + "scale: 1.0  # set by agent eval calibrate\n"
    assert "wrote 'scale: 1.0" in result.stderr and "scale 0.5: generated 3/3" in result.stderr
    assert Persona.from_dir(bundles["alpha"]).scale == 1.0


def test_calibrate_command_json_and_refusals(calibrate_cli) -> None:
    run, bundles = calibrate_cli
    file = bundles["alpha"] / "persona.yaml"
    before = file.read_text()
    result = run("-p", "alpha", "--scales", "1.5", "--limit", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["scale"] for p in data["points"]] == [1.5] and data["points"][0]["replies"] == 1
    refused = run("-p", "alpha", "--scales", "1", "--max-ppl-ratio", "0.01", "--write")
    assert refused.exit_code == 1
    assert "not written: no scale kept neutral perplexity at most 0.01x" in refused.stderr
    assert file.read_text() == before
    unknown = run("-p", "gamma")
    assert unknown.exit_code == 2 and "'gamma' is not a persona with an adapter" in unknown.stderr
    bad = run("-p", "alpha", "--scales", "3")
    assert bad.exit_code == 2 and "must be a number in (0, 2], got 3.0" in bad.stderr


@pytest.mark.real_model
def test_calibrating_the_philosopher_on_the_real_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperlex.cli import cli, eval_group
    from hyperlex.cli.calibrate import calibrate as command
    from hyperlex.host import Host

    monkeypatch.setitem(eval_group.commands, "calibrate", command)  # as hyperlex.cli does
    bundle = Host().personas["philosopher"].root
    assert bundle is not None
    before = (bundle / "persona.yaml").read_text()
    result = CliRunner().invoke(cli, ["eval", "calibrate", "-p", "philosopher", "--limit", "2",
                                      "--scales", "0.5,1.0", "--max-new-tokens", "40",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    points = {p["scale"]: p for p in data["points"]}
    assert set(points) == {0.5, 1.0}
    assert all(p["replies"] == 2 and p["nll"] > 0 for p in points.values())
    # the trained adapter does not degrade neutral text (docs/personas.md: ratio ~0.7)
    assert points[1.0]["within_bound"] and points[1.0]["neutral_ppl_ratio"] < 1.1
    # the full adapter fits its own held-out replies better than half of it
    assert points[1.0]["nll"] < points[0.5]["nll"]
    assert data["qualified"] and data["recommended"] in points
    assert (bundle / "persona.yaml").read_text() == before  # no --write, nothing written
