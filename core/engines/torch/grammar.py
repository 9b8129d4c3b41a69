"""Grammar-constrained decoding on the torch engine: a transformers logits processor that
holds each row of a ``generate`` call to its response format's grammar
(:class:`hyperlex.structured.GrammarState`).

It runs after the repetition penalty and before temperature, top-k and top-p (transformers
puts a caller's processors first), so greedy and sampled decoding both pick only tokens the
grammar allows, and the end-of-turn token only once the JSON is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hyperlex.errors import HyperlexError
from hyperlex.structured import GrammarState

if TYPE_CHECKING:
    from hyperlex.structured import ResponseFormat


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos: Sequence[int]) -> Any:
    """llguidance's view of the tokenizer (about a third of a second; keep it)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos))


class GrammarProcessor:
    """Masks, for each row, every token its grammar forbids next."""

    def __init__(self, grammar_tokenizer: Any, formats: Sequence[ResponseFormat]):
        self.states = [GrammarState(grammar_tokenizer, f) for f in formats]
        self.started = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import numpy as np
        import torch

        if len(self.states) != input_ids.shape[0]:
            raise HyperlexError(f"{len(self.states)} grammars for a batch of "
                                f"{input_ids.shape[0]} rows")
        if self.started:
            for state, row in zip(self.states, input_ids[:, -1].tolist(), strict=True):
                state.consume(row)
        self.started = True
        allowed = torch.from_numpy(np.stack([state.allowed() for state in self.states]))
        return scores.masked_fill(~allowed[:, : scores.shape[1]], float("-inf"))
