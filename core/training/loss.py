"""The training loss, computed only where it is taken.

The loss covers the persona's reply and nothing else, but a causal LM's forward pass makes
logits for every position: a batch of 8 x 320 tokens over SmolLM2's 49,152-token vocabulary
is 0.5 GB of float32 logits, and softmax, loss and gradients each keep a copy of that size.
Here the model's body gives the hidden states, only the positions whose next token is a
reply token are kept, and the output head and the cross-entropy run over those in chunks.
Each chunk's logits are recomputed in the backward pass (``torch.utils.checkpoint``), so at
most one chunk of logits exists at a time, forward or backward. The idea is Liger-Kernel's
fused linear cross-entropy and Apple's Cut Cross-Entropy, without their GPU kernels.

The result equals ``model(**batch).loss`` (mean token cross-entropy in float32 over the
labels that are not -100, shifted by one) and so do its gradients, to float tolerance.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100
LOGIT_BYTES = 4  # float32
COPIES = 3  # a chunk's logits, its softmax, and their gradient in the backward pass
DEFAULT_BUDGET = 128 * 2**20  # bytes of logits a chunk may take


def chunk_tokens(vocab_size: int, budget: int = DEFAULT_BUDGET) -> int:
    """Tokens per chunk so that one chunk's logits and their copies fit ``budget`` bytes."""
    return max(1, budget // (vocab_size * LOGIT_BYTES * COPIES))


def _parts(model: Any) -> tuple[Any, Any]:
    """The body (hidden states) and the output head of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def reply_loss(model: Any, batch: dict[str, Any], chunk: int | None = None) -> Any:
    """Mean cross-entropy of ``batch["labels"]`` (``IGNORE`` where there is no loss) given
    ``input_ids`` and ``attention_mask``, with ``chunk`` positions of logits at a time
    (default: :func:`chunk_tokens` of the head's vocabulary)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    body, head = _parts(model)
    hidden = body(input_ids=batch["input_ids"],
                  attention_mask=batch.get("attention_mask")).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE
    states = hidden[:, :-1][where]  # (reply tokens, hidden size)
    wanted = targets[where]
    count = wanted.numel()
    if count == 0:
        return hidden.sum() * 0.0  # no reply token: a zero loss that still has a graph
    step = chunk or chunk_tokens(head.weight.shape[0])

    def chunk_loss(part: Any, labels: Any) -> Any:
        return F.cross_entropy(head(part).float(), labels, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=states.device)
    for start in range(0, count, step):
        part, labels = states[start:start + step], wanted[start:start + step]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, part, labels, use_reentrant=False)
        else:
            total = total + chunk_loss(part, labels)
    return total / count
