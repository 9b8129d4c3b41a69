"""The torch engine on a tiny random Llama: attach, switch, stream, stop, cancel, lock."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import Persona

from .conftest import write_bundle

GREEDY = GenerationParams(temperature=0, max_new_tokens=12)
MESSAGES = [{"role": "system", "content": "You are a test."},
            {"role": "user", "content": "What is time?"}]


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_bundles: dict[str, Path]):
    from hyperlex.engines.torch.engine import TorchEngine

    personas = [Persona.from_dir(path) for path in tiny_bundles.values()]
    return TorchEngine(personas, base=str(tiny_base), progress=False)


def reply(engine, persona, params=GREEDY, **kwargs) -> str:
    return engine.generate(MESSAGES, persona, params, **kwargs).text


def test_every_persona_adapter_is_attached_under_its_name(engine) -> None:
    assert engine.base_name == "tiny-llama"
    assert set(engine.personas) == {"alpha", "beta"}
    assert set(engine.model.peft_config) == {"alpha", "beta"}


def test_each_persona_changes_the_output_and_switching_back_restores_it(engine) -> None:
    base, alpha, beta = (reply(engine, p) for p in (None, "alpha", "beta"))
    assert len({base, alpha, beta}) == 3
    assert [reply(engine, p) for p in ("beta", None, "alpha")] == [beta, base, alpha]


def test_fast_switch_matches_peft_set_adapter(engine) -> None:
    import torch

    inputs = engine.encode(MESSAGES)
    for persona in ("alpha", "beta"):
        with torch.no_grad(), engine.activate(persona) as model:
            ours = model(**inputs).logits
            engine.model.set_adapter(persona)
            reference = engine.model(**inputs).logits
        torch.testing.assert_close(ours, reference)
    with torch.no_grad(), engine.model.disable_adapter():
        bare = engine.model(**inputs).logits
    with torch.no_grad(), engine.activate(None) as model:
        torch.testing.assert_close(model(**inputs).logits, bare)


def _peft_reference_logits(tiny_base: Path, bundles: list[Path], inputs) -> dict[str, object]:
    """Each adapter loaded by PEFT's own ``from_pretrained`` / ``load_adapter``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    for bundle in bundles:
        if isinstance(model, PeftModel):
            model.load_adapter(str(bundle / "adapter"), adapter_name=bundle.name)
        else:
            model = PeftModel.from_pretrained(model, str(bundle / "adapter"),
                                              adapter_name=bundle.name)
    model.eval()
    logits = {}
    for bundle in bundles:
        model.set_adapter(bundle.name)
        with torch.no_grad():
            logits[bundle.name] = model(**inputs).logits
    return logits


def test_adapters_attached_in_one_pass_equal_peft_load_adapter(
        tiny_base: Path, tmp_path: Path) -> None:
    """The engine adds later adapters straight onto the existing LoRA layers; an adapter with
    other target modules goes through PEFT's ``load_adapter``. Every one must give exactly
    PEFT's logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hyperlex.engines.torch.engine import TorchEngine

    bundles = [write_bundle(tmp_path, f"p{i}", tiny_base=tiny_base, adapter_seed=i)
               for i in range(3)]
    narrow = write_bundle(tmp_path, "narrow", adapter_seed=None)
    torch.manual_seed(7)
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, use_rslora=True,
                        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config) \
        .save_pretrained(narrow / "adapter")
    (narrow / "persona.yaml").write_text(
        (narrow / "persona.yaml").read_text().replace("contract:", "adapter: adapter/\ncontract:"))
    order = [bundles[0], narrow, bundles[1], bundles[2]]
    engine = TorchEngine([Persona.from_dir(b) for b in order], base=str(tiny_base),
                         progress=False)
    assert not engine.skipped
    inputs = engine.encode(MESSAGES)
    reference = _peft_reference_logits(tiny_base, order, inputs)
    for bundle in order:
        with torch.no_grad(), engine.activate(bundle.name) as model:
            torch.testing.assert_close(model(**inputs).logits, reference[bundle.name],
                                       rtol=0, atol=0, msg=bundle.name)


def test_an_adapter_attached_in_one_pass_on_a_4bit_base_matches_peft(
        tiny_base: Path, tiny_bundles: dict[str, Path]) -> None:
    """On an NF4 base, beta added straight onto alpha's layers answers as beta loaded by
    PEFT itself (alone, through ``PeftModel.from_pretrained``)."""
    from hyperlex.engines.torch.engine import TorchEngine

    alpha, beta = (Persona.from_dir(tiny_bundles[n]) for n in ("alpha", "beta"))
    both = TorchEngine([alpha, beta], base=str(tiny_base), quantize="nf4", progress=False)
    alone = TorchEngine([beta], base=str(tiny_base), quantize="nf4", progress=False)
    assert reply(both, "beta") == reply(alone, "beta")


def test_streamed_pieces_add_up_to_the_reply_and_usage_is_counted(engine) -> None:
    generation = engine.stream(MESSAGES, "alpha", GREEDY)
    pieces = list(generation)
    assert "".join(pieces) == generation.text == reply(engine, "alpha")
    assert pieces
    assert generation.usage.prompt_tokens == engine.count_tokens(MESSAGES)
    assert 0 < generation.usage.completion_tokens <= GREEDY.max_new_tokens
    assert generation.finish_reason in ("stop", "length")


def test_stop_string_cuts_the_reply(engine) -> None:
    full = reply(engine, "beta")
    stop = full[3:6]
    cut = engine.generate(MESSAGES, "beta", GREEDY, stop=[stop])
    assert cut.text == full[:full.index(stop)]
    assert cut.finish_reason == "stop"


def test_cancel_stops_generation_early(engine) -> None:
    generation = engine.stream(MESSAGES, "alpha", GREEDY.updated({"max_new_tokens": 200}))
    for _ in generation:
        generation.cancel()
    assert generation.finish_reason == "cancelled"
    assert generation.usage.completion_tokens < 200


def test_closing_the_stream_early_releases_the_engine(engine) -> None:
    generation = engine.stream(MESSAGES, "alpha", GREEDY.updated({"max_new_tokens": 200}))
    iterator = iter(generation)
    next(iterator)
    iterator.close()
    assert generation.finish_reason == "cancelled"
    assert reply(engine, "beta")  # the lock was released


def test_concurrent_callers_never_get_another_personas_weights(engine) -> None:
    expected = {p: reply(engine, p) for p in ("alpha", "beta")}
    results: list[tuple[str, str]] = []

    def worker(persona: str) -> None:
        for _ in range(3):
            results.append((persona, reply(engine, persona)))

    threads = [threading.Thread(target=worker, args=(p,)) for p in ("alpha", "beta") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    assert all(text == expected[persona] for persona, text in results)


def test_sampling_with_a_seed_is_reproducible(engine) -> None:
    params = GenerationParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=7)
    assert reply(engine, "alpha", params) == reply(engine, "alpha", params)


def test_unknown_persona_is_a_clear_error(engine) -> None:
    with pytest.raises(UnknownPersona, match="installed personas: alpha, beta"):
        engine.stream(MESSAGES, "gamma")


def test_adapter_for_another_base_is_skipped_with_a_reason(tiny_base: Path, tmp_path: Path,
                                                           tiny_bundles: dict[str, Path]) -> None:
    from hyperlex.engines.torch.engine import TorchEngine

    from .conftest import write_bundle

    other = Persona.from_dir(write_bundle(tmp_path, "stranger", base_model="other-base",
                                          adapter_seed=3, tiny_base=tiny_base))
    engine = TorchEngine([other, Persona.from_dir(tiny_bundles["alpha"])], base=str(tiny_base))
    assert list(engine.personas) == ["alpha"]
    assert "trained on base 'other-base', but the loaded base is 'tiny-llama'" in \
        engine.skipped["stranger"]
    with pytest.raises(HyperlexError, match="other-base"):
        engine.stream(MESSAGES, "stranger")


def test_bfloat16_base_runs_the_same_personas(tiny_base: Path,
                                             tiny_bundles: dict[str, Path]) -> None:
    import torch

    from hyperlex.engines.torch.engine import TorchEngine

    engine = TorchEngine([Persona.from_dir(tiny_bundles["alpha"])], base=str(tiny_base),
                         dtype="bfloat16")
    assert engine.inner_model.dtype == torch.bfloat16
    assert engine.generate(MESSAGES, "alpha", GREEDY).usage.completion_tokens > 0


def test_bfloat16_adapter_stays_bfloat16_resident_and_agrees_with_float32(
        tiny_base: Path, tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from hyperlex.engines.torch.engine import TorchEngine

    half = Path(shutil.copytree(tiny_bundles["alpha"], tmp_path / "halved"))
    text = (half / "persona.yaml").read_text().replace("name: alpha", "name: halved")
    (half / "persona.yaml").write_text(text)
    weights = half / "adapter" / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    engine = TorchEngine([Persona.from_dir(tiny_bundles["alpha"]), Persona.from_dir(half)],
                         base=str(tiny_base))
    assert not engine.skipped, engine.skipped
    sizes = engine.adapter_bytes()
    assert sizes["halved"] * 2 == sizes["alpha"]
    assert sizes["__base__"] > sizes["alpha"]
    inputs = engine.encode(MESSAGES)
    logits = {}
    for persona in ("alpha", "halved"):
        with torch.no_grad(), engine.activate(persona) as model:
            logits[persona] = model(**inputs).logits
    torch.testing.assert_close(logits["halved"], logits["alpha"], atol=0.05, rtol=0.05)


def test_persona_named_like_a_torch_method_is_skipped_with_a_reason(
        tiny_base: Path, tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from hyperlex.engines.torch.engine import TorchEngine

    clash = Path(shutil.copytree(tiny_bundles["alpha"], tmp_path / "train"))
    (clash / "persona.yaml").write_text(
        (clash / "persona.yaml").read_text().replace("name: alpha", "name: train"))
    engine = TorchEngine([Persona.from_dir(clash), Persona.from_dir(tiny_bundles["beta"])],
                         base=str(tiny_base))
    assert list(engine.personas) == ["beta"]
    assert "clashes with a torch module attribute" in engine.skipped["train"]


@pytest.fixture(scope="module")
def mood_engine(tiny_base: Path, tiny_bundles: dict[str, Path], tmp_path_factory):
    from hyperlex.engines.torch.engine import TorchEngine

    gloom = write_bundle(tmp_path_factory.mktemp("moods"), "gloom", adapter_seed=7,
                         tiny_base=tiny_base, extra_yaml="kind: mood\n")
    bundles = [Persona.from_dir(tiny_bundles["alpha"]), Persona.from_dir(gloom)]
    return TorchEngine(bundles, base=str(tiny_base), progress=False)


def test_a_mood_is_a_layer_not_a_persona(mood_engine) -> None:
    assert set(mood_engine.personas) == {"alpha"} and set(mood_engine.moods) == {"gloom"}
    with pytest.raises(UnknownPersona, match="unknown persona 'gloom'"):
        mood_engine.stream(MESSAGES, "gloom")
    with pytest.raises(UnknownPersona, match="unknown mood 'alpha'; installed moods: gloom"):
        mood_engine.stream(MESSAGES, "alpha", layers=[("alpha", 1.0)])


def test_a_mood_layer_adds_its_adapter_on_top_of_the_persona(mood_engine) -> None:
    import torch

    inputs = mood_engine.encode(MESSAGES)
    with torch.no_grad():
        with mood_engine.activate("alpha", [("gloom", 1.0)]) as model:
            composed = model(**inputs).logits
            mood_engine.model.base_model.set_adapter(["alpha", "gloom"])
            reference = mood_engine.model(**inputs).logits
        with mood_engine.activate("alpha", [("gloom", 0.5)]) as model:
            half = model(**inputs).logits
        with mood_engine.activate("alpha") as model:
            alone = model(**inputs).logits
    torch.testing.assert_close(composed, reference)
    assert not torch.allclose(composed, alone, atol=1e-4)
    assert not torch.allclose(half, composed, atol=1e-4)
    assert not torch.allclose(half, alone, atol=1e-4)
    with_mood = reply(mood_engine, "alpha", layers=[("gloom", 1.0)])
    assert reply(mood_engine, "alpha") != with_mood
    assert reply(mood_engine, "alpha", layers=[("gloom", 1.0)]) == with_mood


def test_batched_generation_with_a_mood_matches_one_at_a_time(mood_engine) -> None:
    other = [{"role": "user", "content": "Tell me about the sea."}]
    requests = [(MESSAGES, "alpha"), (other, None), (other, "alpha")]
    layers = [("gloom", 0.7)]
    batched = [c.text for c in mood_engine.generate_batch(requests, GREEDY, layers=layers)]
    single = [mood_engine.generate(m, p, GREEDY, layers=layers).text for m, p in requests]
    assert batched == single
    assert batched[0] != reply(mood_engine, "alpha")


def test_merged_persona_gives_the_unmerged_logits_and_switching_restores_the_base(
        tiny_base: Path, tiny_bundles: dict[str, Path], engine) -> None:
    import torch

    from hyperlex.engines.torch.engine import TorchEngine

    personas = [Persona.from_dir(path) for path in tiny_bundles.values()]
    merged = TorchEngine(personas, base=str(tiny_base), progress=False, merge=True)
    inputs = engine.encode(MESSAGES)

    def logits(which, persona):
        with torch.no_grad(), which.activate(persona) as model:
            return model(**inputs).logits

    for _ in range(20):  # many switches: the base must not drift
        for persona in ("alpha", "beta", None):
            torch.testing.assert_close(logits(merged, persona), logits(engine, persona),
                                       rtol=1e-4, atol=1e-4, msg=str(persona))
    with merged.activate("alpha"):
        assert merged.merged == "alpha"
    requests = [(MESSAGES, "alpha"), (MESSAGES, "beta"), (MESSAGES, None)]
    assert [c.text for c in merged.generate_batch(requests, GREEDY)] == \
        [c.text for c in engine.generate_batch(requests, GREEDY)]
    assert [reply(merged, p) for p in ("beta", "alpha")] == [reply(engine, p)
                                                             for p in ("beta", "alpha")]


def test_merging_refuses_a_base_that_cannot_hold_merged_weights(tiny_base: Path) -> None:
    from hyperlex.engines.torch.engine import TorchEngine

    with pytest.raises(HyperlexError, match="float32 base"):
        TorchEngine([], base=str(tiny_base), dtype="bfloat16", merge=True, progress=False)
