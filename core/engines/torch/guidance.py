"""Scene guidance on the torch engine: context-aware decoding (Shi et al., 2023, "Trusting
Your Evidence: Hallucinate Less with Context-aware Decoding") as a logits processor.

Each step the model also runs on a *negative* prompt (the same chat without the scene),
and the next token is chosen from

    log p(y | prompt) + w * (log p(y | prompt) - log p(y | negative))

so what the scene adds to the prediction is amplified by ``w`` and what the persona would
say anyway is not. Tokens the prompt itself finds implausible, below
:data:`PLAUSIBILITY` times its most likely token, are ruled out first (the adaptive
plausibility constraint of contrastive decoding, Li et al., 2023): without it a large
``w`` promotes rare tokens the negative prompt merely finds even rarer.

The negative prompt runs with the same adapters as the row it guides and keeps its own
key/value cache, so a guided step costs one extra one-token forward per row. (transformers'
``UnbatchedClassifierFreeGuidanceLogitsProcessor`` applies the same rule; it has no
plausibility constraint, no per-row adapters and no position ids for left-padded
negatives, which a batch of personas needs.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

PLAUSIBILITY = 0.1
"""A token stays a candidate when the prompt gives it at least this fraction of the
probability of its most likely token."""


def guided_scores(scores: Any, negative_logits: Any, weight: float,
                  plausibility: float = PLAUSIBILITY) -> Any:
    """The guided log-probabilities of one step (rows × vocabulary) from the prompt's
    ``scores`` and the negative prompt's logits; ruled-out tokens are ``-inf``."""
    import torch

    positive = torch.log_softmax(scores.float(), dim=-1)
    negative = torch.log_softmax(negative_logits.float(), dim=-1)
    guided = positive + weight * (positive - negative)
    floor = positive.max(dim=-1, keepdim=True).values + math.log(plausibility)
    return guided.masked_fill(positive < floor, -math.inf)


class SceneGuidance:
    """A transformers logits processor guiding every row of one ``generate`` call away from
    its negative prompt (``negative_ids`` / ``negative_mask``: left-padded, one row per
    generated row). ``adapter_names``: PEFT's per-row adapters, as the call itself uses."""

    def __init__(self, model: Any, negative_ids: Any, negative_mask: Any, weight: float,
                 adapter_names: Sequence[str] | None = None,
                 plausibility: float = PLAUSIBILITY):
        self.model = model
        self.weight = weight
        self.plausibility = plausibility
        self._ids = negative_ids
        self._mask = negative_mask
        self._extra = {"adapter_names": list(adapter_names)} if adapter_names else {}
        self._cache: Any = None

    def _negative_logits(self, input_ids: Any) -> Any:
        import torch

        if self._cache is None:
            ids = self._ids
        else:
            ids = input_ids[:, -1:]
            self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        positions = (self._mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                         cache=self._cache, use_cache=True, logits_to_keep=1, **self._extra)
        self._cache = out.cache
        return out.logits[:, -1]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return guided_scores(scores, self._negative_logits(input_ids), self.weight,
                             self.plausibility).to(scores.dtype)
