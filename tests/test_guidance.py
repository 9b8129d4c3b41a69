"""Scene guidance (context-aware decoding) on the torch engine, with a tiny random Llama: the
step rule, the batched processor against a step-by-step reference, and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hyperlex.errors import HyperlexError
from hyperlex.generation import GenerationParams, Guidance, InvalidParameter
from hyperlex.persona.bundle import Persona

from .conftest import write_bundle

GREEDY = GenerationParams(temperature=0, max_new_tokens=10)
QUESTION = [{"role": "system", "content": "You are a test. The sea is calm."},
            {"role": "user", "content": "What is time?"}]
OTHER = [{"role": "system", "content": "You are a test. A sailor does not see the lighthouse."},
         {"role": "user", "content": "Tell me about the sea, slowly, in a few words."}]
BARE = [{"role": "system", "content": "You are a test."},
        {"role": "user", "content": "What is time?"}]
REQUESTS = [(QUESTION, "alpha"), (OTHER, "beta"), (OTHER, None)]
NEGATIVES = [BARE, BARE, [{"role": "user", "content": "Tell me."}]]


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_bundles: dict[str, Path], tmp_path_factory):
    from hyperlex.engines.torch.engine import TorchEngine

    gloom = write_bundle(tmp_path_factory.mktemp("moods"), "gloom", adapter_seed=7,
                         tiny_base=tiny_base, extra_yaml="kind: mood\n")
    personas = [Persona.from_dir(path) for path in [*tiny_bundles.values(), gloom]]
    return TorchEngine(personas, base=str(tiny_base), progress=False)


def test_the_step_rule_favours_what_the_prompt_adds_among_plausible_tokens() -> None:
    import torch

    from hyperlex.engines.torch.guidance import guided_scores

    prompt = torch.log(torch.tensor([[0.50, 0.40, 0.06, 0.04]]))
    negative = torch.log(torch.tensor([[0.70, 0.10, 0.10, 0.0001]]))
    # unguided the first token wins; the prompt raised the second's odds fourfold
    assert guided_scores(prompt, negative, 0.0).argmax().item() == 0
    assert guided_scores(prompt, negative, 1.0).argmax().item() == 1
    # the last token gained most (400x) but the prompt finds it implausible (< 0.1 x best)
    scores = guided_scores(prompt, negative, 10.0)
    assert scores[0, 3].item() == -math.inf and scores[0, 2].item() > -math.inf
    assert scores.argmax().item() == 1
    # a negative prompt equal to the prompt changes nothing among plausible tokens
    same = guided_scores(prompt, prompt, 5.0)
    torch.testing.assert_close(same[0, :2], torch.log_softmax(prompt, -1)[0, :2])


def reference_reply(engine, messages, persona, negative, weight: float, steps: int,
                    layers=()) -> str:
    """Greedy guided decoding one token at a time, both prompts run whole at every step."""
    import torch

    from hyperlex.engines.torch.generation import complete_text, eos_ids
    from hyperlex.engines.torch.guidance import guided_scores

    prompt = engine.encode(messages)["input_ids"]
    unguided = engine.encode(negative)["input_ids"]
    eos = set(eos_ids(engine.tokenizer, engine.inner_model))
    tokens: list[int] = []
    with engine.activate(persona, layers) as model, torch.inference_mode():
        for _ in range(steps):
            tail = torch.tensor([tokens], dtype=torch.long)
            scores = model(input_ids=torch.cat([prompt, tail], 1)).logits[:, -1]
            negative_logits = model(input_ids=torch.cat([unguided, tail], 1)).logits[:, -1]
            token = int(guided_scores(scores, negative_logits, weight).argmax())
            if token in eos:
                break
            tokens.append(token)
    return complete_text(engine.tokenizer.decode(tokens, skip_special_tokens=True))


def test_a_guided_batch_decodes_each_row_as_step_by_step_guidance_would(engine) -> None:
    """Rows of different lengths, each with its own adapter (or none) and a negative prompt
    of another length: the processor's cache, padding and positions must be each row's."""
    guided = engine.generate_batch(REQUESTS, GREEDY, guidance=Guidance(4.0, NEGATIVES))
    expected = [reference_reply(engine, m, p, n, 4.0, GREEDY.max_new_tokens)
                for (m, p), n in zip(REQUESTS, NEGATIVES, strict=True)]
    assert [c.text for c in guided] == expected
    plain = [c.text for c in engine.generate_batch(REQUESTS, GREEDY)]
    assert [c.text for c in guided] != plain


def test_guidance_against_the_prompt_itself_or_at_weight_zero_changes_nothing(engine) -> None:
    plain = [c.text for c in engine.generate_batch(REQUESTS, GREEDY)]
    itself = Guidance(3.0, [m for m, _ in REQUESTS])
    assert [c.text for c in engine.generate_batch(REQUESTS, GREEDY, guidance=itself)] == plain
    off = Guidance(0.0, NEGATIVES)
    assert [c.text for c in engine.generate_batch(REQUESTS, GREEDY, guidance=off)] == plain


def test_guidance_composes_with_a_mood_layer(engine) -> None:
    """With layers the rows run grouped by persona, each group with its own negatives."""
    layered = [(QUESTION, "alpha"), (OTHER, "beta"), (OTHER, "alpha")]
    layers = [("gloom", 0.5)]
    guided = engine.generate_batch(layered, GREEDY, layers=layers,
                                   guidance=Guidance(4.0, NEGATIVES))
    expected = [reference_reply(engine, m, p, n, 4.0, GREEDY.max_new_tokens, layers)
                for (m, p), n in zip(layered, NEGATIVES, strict=True)]
    assert [c.text for c in guided] == expected


def test_guidance_is_checked_where_it_is_given(engine) -> None:
    with pytest.raises(InvalidParameter, match="guidance weight"):
        Guidance(-1.0, [])
    with pytest.raises(HyperlexError, match="one negative prompt per request: 1 for 3"):
        engine.generate_batch(REQUESTS, GREEDY, guidance=Guidance(2.0, [BARE]))


def test_an_engine_without_guidance_refuses_it_by_name() -> None:
    from hyperlex.engines.openai import OpenAIEngine

    engine = OpenAIEngine.__new__(OpenAIEngine)
    with pytest.raises(HyperlexError, match="torch engine only, not on OpenAIEngine"):
        engine.generate_batch([(BARE, None)], GREEDY, guidance=Guidance(1.0, [BARE]))
