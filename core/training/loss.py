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

An *anchor* adds the KL divergence from an earlier adapter's next-token distribution at the
same reply positions (learning without forgetting, Li & Hoiem 2016; Hinton's distillation):
a further round then learns its new records while its distribution elsewhere stays the
earlier voice's, the whole distribution rather than one sample of it. LoRA never touches
the output head, so the anchor's final hidden states at reply positions
(:func:`reply_states`, computed once before the round) give its logits through the same
head, chunk by chunk beside the cross-entropy.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100
LOGIT_BYTES = 4  # float32
COPIES = 3  # a chunk's logits, its softmax, and their gradient in the backward pass
ANCHOR_COPIES = 2  # with an anchor: its logits and their log-softmax
DEFAULT_BUDGET = 128 * 2**20  # bytes of logits a chunk may take


def chunk_tokens(vocab_size: int, budget: int = DEFAULT_BUDGET, copies: int = COPIES) -> int:
    """Tokens per chunk so that one chunk's logits and their ``copies`` fit ``budget`` bytes."""
    return max(1, budget // (vocab_size * LOGIT_BYTES * copies))


def _parts(model: Any) -> tuple[Any, Any]:
    """The body (hidden states) and the output head of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _reply_positions(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The whole hidden states, those whose next token is a reply token (rows in order), and
    those tokens."""
    body = _parts(model)[0]
    hidden = body(input_ids=batch["input_ids"],
                  attention_mask=batch.get("attention_mask")).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE
    return hidden, hidden[:, :-1][where], targets[where]


def reply_states(model: Any, batch: dict[str, Any]) -> list[Any]:
    """Each row's final hidden states (float32, no graph) at the positions whose next token
    is a reply token: what an anchor gives :func:`reply_loss`, row by row."""
    import torch

    with torch.no_grad():
        _, states, _ = _reply_positions(model, batch)
    counts = (batch["labels"][:, 1:] != IGNORE).sum(dim=1).tolist()
    return list(states.float().split(counts))


def reply_loss(model: Any, batch: dict[str, Any], chunk: int | None = None,
               anchor: Any = None, anchor_weight: float = 1.0) -> Any:
    """Mean cross-entropy of ``batch["labels"]`` (``IGNORE`` where there is no loss) given
    ``input_ids`` and ``attention_mask``, with ``chunk`` positions of logits at a time
    (default: :func:`chunk_tokens` of the head's vocabulary). With ``anchor`` (the anchor's
    :func:`reply_states` of the batch's rows, concatenated), ``anchor_weight`` times the mean
    KL(anchor || model) is added."""
    return sum_terms(reply_terms(model, batch, chunk, anchor), anchor_weight)


def sum_terms(terms: tuple[Any, Any], anchor_weight: float) -> Any:
    """The loss of :func:`reply_terms`' (cross-entropy, KL) at this anchor weight."""
    cross_entropy, divergence = terms
    return cross_entropy if divergence is None else cross_entropy + anchor_weight * divergence


def reply_terms(model: Any, batch: dict[str, Any], chunk: int | None = None,
                anchor: Any = None, held: Any = None) -> tuple[Any, Any]:
    """:func:`reply_loss`'s two terms, each a mean over reply tokens: the cross-entropy, and
    the KL divergence from ``anchor`` (None without one). ``held`` (a bool per reply
    position; default: all) says where the anchor holds; elsewhere the model's own states
    stand in for the anchor's, which adds nothing to the KL nor to its gradient."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    head = _parts(model)[1]
    hidden, states, wanted = _reply_positions(model, batch)
    count = wanted.numel()
    if anchor is not None and anchor.shape[0] != count:
        raise ValueError(f"the anchor has {anchor.shape[0]} reply positions, the batch {count}")
    if anchor is not None and held is not None:
        anchor = torch.where(held[:, None], anchor, states.detach().to(anchor.dtype))
    if count == 0:
        zero = hidden.sum() * 0.0  # no reply token: a zero loss that still has a graph
        return zero, None if anchor is None else zero
    step = chunk or chunk_tokens(head.weight.shape[0],
                                 copies=COPIES + (ANCHOR_COPIES if anchor is not None else 0))

    def chunk_terms(part: Any, labels: Any, *anchored: Any) -> tuple[Any, Any]:
        logits = head(part).float()
        cross_entropy = F.cross_entropy(logits, labels, reduction="sum")
        if not anchored:
            return cross_entropy, cross_entropy.new_zeros(())
        with torch.no_grad():
            target = F.log_softmax(head(anchored[0].to(part.dtype)).float(), dim=-1)
        divergence = F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="sum",
                              log_target=True)
        return cross_entropy, divergence

    totals = [torch.zeros((), dtype=torch.float32, device=states.device) for _ in range(2)]
    for start in range(0, count, step):
        span = slice(start, start + step)
        args = (states[span], wanted[span], *(() if anchor is None else (anchor[span],)))
        if torch.is_grad_enabled():
            terms = checkpoint(chunk_terms, *args, use_reentrant=False)
        else:
            terms = chunk_terms(*args)
        totals = [total + term for total, term in zip(totals, terms, strict=True)]
    return totals[0] / count, None if anchor is None else totals[1] / count
