"""Generation options: one validation for persona contracts and `-o`."""

from __future__ import annotations

import pytest

from hyperlex.generation import GenerationParams, InvalidParameter, parse_options


def test_command_line_values_are_converted() -> None:
    options = parse_options([("temperature", "0"), ("max_new_tokens", "64"), ("seed", "3")])
    assert options == {"temperature": 0.0, "max_new_tokens": 64, "seed": 3}
    params = GenerationParams().updated(options)
    assert params.greedy and params.max_new_tokens == 64


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("temprature", "1", "unknown generation option 'temprature'"),
        ("temperature", "-1", "temperature must be >= 0"),
        ("temperature", "nan", "temperature must be a finite number"),
        ("top_p", "1.5", "top_p must be in (0, 1]"),
        ("max_new_tokens", "2.5", "max_new_tokens must be an integer"),
        ("max_new_tokens", "0", "max_new_tokens must be >= 1"),
        ("max_new_tokens", float("inf"), "max_new_tokens must be an integer"),
        ("repetition_penalty", "0", "repetition_penalty must be > 0"),
    ],
)
def test_bad_values_name_the_option_and_the_rule(key: str, value: str, problem: str) -> None:
    with pytest.raises(InvalidParameter, match=r"^-o: ") as info:
        parse_options([(key, value)])
    assert problem in str(info.value)


def test_seed_can_be_reset_to_none() -> None:
    assert parse_options([("seed", "none")]) == {"seed": None}
    assert GenerationParams(seed=4).updated({"seed": None}, "contract.generation").seed is None


def test_one_finish_reason_rule_for_every_engine() -> None:
    from hyperlex.generation import finish_reason

    assert finish_reason(8, 8, ended=False) == "length"  # cut at max_new_tokens
    assert finish_reason(8, 8, ended=True) == "stop"  # the end token came last
    assert finish_reason(3, 8, ended=False) == "stop"  # shorter than the limit: it ended
    assert finish_reason(8, 8, ended=False, cancelled=True) == "cancelled"


def test_nothing_is_yielded_after_cancel_returns() -> None:
    from hyperlex.generation import Generation

    class Queued(Generation):  # a backend that already produced three pieces
        def _pieces(self):
            yield from ("a", "b", "c")

    generation, seen = Queued("p"), []
    for piece in generation:
        seen.append(piece)
        generation.cancel()
    assert seen == ["a"] and generation.text == "a"
    assert generation.finish_reason == "cancelled"


def test_a_reply_cancelled_before_it_was_read_whole_is_cancelled() -> None:
    """A backend that finished its reply (and said why) before the caller read it all: the
    caller's cancel wins, so a stopped turn is never recorded as a whole one."""
    from hyperlex.generation import Generation

    class Finished(Generation):
        def _pieces(self):
            self.finish_reason = "length"  # the whole reply was generated ahead
            yield from ("a", "b", "c")

    generation = Finished("p")
    for _ in generation:
        generation.cancel()
    assert generation.text == "a" and generation.finish_reason == "cancelled"


def test_cancel_during_the_last_piece_still_cancels() -> None:
    from hyperlex.generation import Generation

    class Two(Generation):
        def _pieces(self):
            self.finish_reason = "stop"
            yield from ("a", "b")

    generation = Two("p")
    for piece in generation:
        if piece == "b":
            generation.cancel()
    assert generation.text == "ab" and generation.finish_reason == "cancelled"


def test_the_repetition_penalty_counts_the_reply_not_the_prompt() -> None:
    """A persona must be free to say the user's words again: on both engines the penalty
    divides the scores of tokens the reply has produced, never of the prompt's."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from hyperlex.engines.llamacpp.engine import Sampler
    from hyperlex.engines.torch.generation import generate_kwargs

    params = GenerationParams(temperature=0, max_new_tokens=4, repetition_penalty=2.0)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    processors = generate_kwargs(params, tokenizer, prompt_width=3)["logits_processor"]
    scores = processors(torch.tensor([[1, 2, 3, 4]]), torch.full((1, 6), 4.0))
    assert scores[0].tolist() == [4.0, 4.0, 4.0, 4.0, 2.0, 4.0]

    sampler = Sampler(params)
    logits = np.array([0.0, 3.0, 2.0, 1.0])
    assert sampler.next(logits.copy()) == 1  # nothing said yet: no penalty
    assert sampler.next(logits.copy()) == 2  # 1 was said: 3.0 / 2 < 2.0
