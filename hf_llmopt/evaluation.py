"""Held-out evaluation: perplexity and KL divergence to a reference model on token blocks."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def eval_mode(*models):
    """Run the block with ``models`` in eval mode (no dropout); each gets its training flag back, also on error."""
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, pad_token_id: int | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over ``blocks`` (``(N, T)`` token ids).

    Positions whose target is ``pad_token_id`` are not scored.
    """
    total_nll, total_tokens = 0.0, 0
    with eval_mode(model):
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start:start + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            mask = (torch.ones_like(nll, dtype=torch.bool) if pad_token_id is None
                    else targets.reshape(-1) != pad_token_id)
            total_nll += float(nll[mask].sum())
            total_tokens += int(mask.sum())
    return math.exp(total_nll / max(total_tokens, 1))


@torch.no_grad()
def kl_to_reference(model, reference, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean per-token KL(reference || model) of the next-token distributions."""
    total, count = 0.0, 0
    with eval_mode(model, reference):
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start:start + batch_size]
            p_log = F.log_softmax(reference(input_ids=batch).logits.float(), -1)
            q_log = F.log_softmax(model(input_ids=batch).logits.float(), -1)
            total += float((p_log.exp() * (p_log - q_log)).sum(-1).sum())
            count += batch.numel()
    return total / max(count, 1)
