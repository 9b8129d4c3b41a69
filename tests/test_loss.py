"""The reply-only chunked loss equals the full-logits loss of transformers, and so do the
LoRA gradients, on the tiny model in float32 (issue 20); an anchor's KL term equals the KL
computed from both models' full logits."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperlex.training.loss import chunk_tokens, reply_loss, reply_states, reply_terms


def lora_model(tiny_base: Path, checkpointing: bool = False, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), torch_dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False))
    model.train()
    return model


def a_batch(vocab: int):
    """Three rows of different lengths, padded; the loss only on each row's tail."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (length, prompt) in enumerate(((24, 10), (17, 5), (9, 8))):
        mask[row, length:] = 0
        labels[row, prompt:length] = ids[row, prompt:length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, chunk: int | None):
    model.zero_grad()
    loss = model(**batch).loss if chunk == 0 else reply_loss(model, batch, chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("chunk", [1, 7, None], ids=["chunk1", "chunk7", "auto"])
def test_reply_loss_and_its_gradients_equal_the_full_logits_path(
        tiny_base: Path, chunk: int | None, checkpointing: bool) -> None:
    import torch

    model = lora_model(tiny_base, checkpointing)
    batch = a_batch(model.config.vocab_size)
    full, full_grads = loss_and_grads(model, batch, 0)
    ours, our_grads = loss_and_grads(model, batch, chunk)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)
    assert our_grads.keys() == full_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_without_gradients_the_loss_is_the_same_and_builds_no_graph(tiny_base: Path) -> None:
    import torch

    model = lora_model(tiny_base)
    batch = a_batch(model.config.vocab_size)
    with torch.no_grad():
        full = model(**batch).loss
        ours = reply_loss(model, batch, 5)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)
    assert not ours.requires_grad


def test_a_batch_with_no_reply_token_has_a_zero_loss_that_backpropagates(tiny_base: Path):
    model = lora_model(tiny_base)
    batch = a_batch(model.config.vocab_size)
    batch["labels"][:] = -100
    loss = reply_loss(model, batch)
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_the_automatic_chunk_keeps_a_chunks_logits_within_the_budget() -> None:
    assert chunk_tokens(49_152, budget=128 * 2**20) == 227
    assert 227 * 49_152 * 4 * 3 <= 128 * 2**20
    assert chunk_tokens(10**9, budget=1) == 1


def test_the_anchor_kl_and_its_gradients_equal_the_full_logits_path(tiny_base: Path) -> None:
    import torch
    import torch.nn.functional as F

    anchor, model = lora_model(tiny_base, seed=1), lora_model(tiny_base, checkpointing=True)
    batch = a_batch(model.config.vocab_size)
    states = torch.cat(reply_states(anchor, batch))
    where = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        target = F.log_softmax(anchor(**batch).logits[:, :-1][where].float(), dim=-1)
    model.zero_grad()
    full = F.kl_div(F.log_softmax(model(**batch).logits[:, :-1][where].float(), dim=-1),
                    target, reduction="batchmean", log_target=True)
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    _, ours = reply_terms(model, batch, 7, states)
    ours.backward()
    assert float(full.detach()) > 0.01  # two different adapters: a divergence worth testing
    torch.testing.assert_close(ours, full.detach(), atol=1e-5, rtol=1e-4)
    for name, grad in full_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5,
                                   rtol=1e-4, msg=name)


def test_anchored_to_itself_the_loss_is_the_plain_loss(tiny_base: Path) -> None:
    import torch

    model = lora_model(tiny_base)
    batch = a_batch(model.config.vocab_size)
    states = reply_states(model, batch)
    assert [len(row) for row in states] == [14, 12, 1]  # each row's reply positions
    plain, plain_grads = loss_and_grads(model, batch, None)
    model.zero_grad()
    anchored = reply_loss(model, batch, 5, torch.cat(states), anchor_weight=3.0)
    anchored.backward()
    torch.testing.assert_close(anchored.detach(), plain, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, plain_grads[name], atol=1e-5, rtol=1e-4,
                                       msg=name)


def test_an_anchor_for_other_rows_is_refused(tiny_base: Path) -> None:
    import torch

    model = lora_model(tiny_base)
    batch = a_batch(model.config.vocab_size)
    states = reply_states(model, batch)
    with pytest.raises(ValueError, match="anchor has 26 reply positions, the batch 27"):
        reply_terms(model, batch, None, torch.cat(states[:2]))


def test_positions_the_anchor_does_not_hold_add_nothing_to_the_kl_or_its_gradient(
        tiny_base: Path) -> None:
    import torch

    anchor, model = lora_model(tiny_base, seed=1), lora_model(tiny_base)
    batch = a_batch(model.config.vocab_size)
    states = reply_states(anchor, batch)
    first = {key: value[:1] for key, value in batch.items()}
    model.zero_grad()
    _, alone = reply_terms(model, first, 5, states[0])
    (alone * len(states[0])).backward()
    alone_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    held = torch.cat([torch.full((len(row),), index == 0) for index, row in enumerate(states)])
    _, mixed = reply_terms(model, batch, 5, torch.cat(states), held)
    (mixed * len(held)).backward()
    torch.testing.assert_close(mixed * len(held), alone * len(states[0]), atol=1e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, alone_grads[name], atol=1e-5, rtol=1e-4,
                                       msg=name)
