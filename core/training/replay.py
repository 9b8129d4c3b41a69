"""Replay records: the bare base model's own text, mixed in to keep an adapter near it.

An adapter trained only on its task drifts on ordinary text: over three rounds the
scene-writer's neutral perplexity ratio rose from 1.07 to 1.17, past the 1.10 that every
adapter is held to. Replay (as in continual learning) mixes some of the base's own
distribution back into training. The base's pretraining data is not available, so the
replay text is the base's own samples at temperature 1: the adapter's cross-entropy on them
is, in expectation, KL(base || adapter) plus the base's entropy, so training on them pulls
the adapter back towards the base on plain text and asks nothing of it on the prompts it is
trained for. The last 5% of the probability mass is cut (top-p 0.95): a 135M model's full
tail turns a sample into word salad within a few sentences.

Each sample starts from the tokenizer's document separator, as a pretraining document does,
and becomes a ``{"plain": TEXT}`` record (:mod:`hyperlex.training.data`): the whole text is
the target, with no chat template, the way ``agent eval fidelity`` scores neutral text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from hyperlex.errors import HyperlexError

MIN_WORDS = 24  # shorter samples (a title, a stray line) teach little about running text
MAX_BARREN_BATCHES = 10
TOP_P = 0.95


def document_start(tokenizer: Any) -> int:
    """The token a pretraining document follows: ``<|endoftext|>`` where the tokenizer has
    it, else its BOS or EOS token."""
    vocabulary = tokenizer.get_vocab()
    for token in ("<|endoftext|>", tokenizer.bos_token, tokenizer.eos_token):
        if token and token in vocabulary:
            return int(vocabulary[token])
    raise HyperlexError("replay: the tokenizer has no <|endoftext|>, BOS or EOS token to "
                        "start a text from")


def replay_texts(model: Any, tokenizer: Any, count: int, seed: int = 0,
                 max_new_tokens: int = 160, batch_size: int = 8, min_words: int = MIN_WORDS,
                 on_batch: Callable[[int], None] | None = None) -> Iterator[str]:
    """``count`` texts sampled from ``model`` at temperature 1, top-p :data:`TOP_P` (seeded,
    so the same call gives the same texts), each at least ``min_words`` words;
    ``on_batch(n)`` after each batch with the ``n`` texts it kept."""
    import torch

    start = document_start(tokenizer)
    generator_seed = seed
    made = barren = 0
    while made < count:
        if barren == MAX_BARREN_BATCHES:
            raise HyperlexError(f"replay: {barren} batches in a row gave no text of "
                                f"{min_words} words or more; is the base a language model?")
        torch.manual_seed(generator_seed)
        generator_seed += 1
        rows = min(batch_size, count - made)
        with torch.inference_mode():
            out = model.generate(torch.full((rows, 1), start, dtype=torch.long),
                                 attention_mask=torch.ones((rows, 1), dtype=torch.long),
                                 do_sample=True, temperature=1.0, top_p=TOP_P, top_k=0,
                                 max_new_tokens=max_new_tokens,
                                 pad_token_id=start, eos_token_id=start)
        kept = 0
        for row in out[:, 1:]:
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            if len(text.split()) >= min_words and made < count:
                made += 1
                kept += 1
                yield text
        barren = 0 if kept else barren + 1
        if on_batch:
            on_batch(kept)
