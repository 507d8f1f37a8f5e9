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
def sequence_nll(model, blocks: torch.Tensor, batch_size: int = 8,
                 pad_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of ``blocks`` (``(N, T)`` token ids): ``(summed next-token NLL (N,) float64, scored tokens (N,))``.

    Positions whose target is ``pad_token_id`` are not scored.
    """
    sums, counts = [], []
    with eval_mode(model):
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start:start + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            mask = torch.ones_like(targets, dtype=torch.bool) if pad_token_id is None else targets != pad_token_id
            sums.append((nll.view(targets.shape).double() * mask).sum(-1))
            counts.append(mask.sum(-1))
    return torch.cat(sums), torch.cat(counts)


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, pad_token_id: int | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over ``blocks`` (``(N, T)`` token ids).

    Positions whose target is ``pad_token_id`` are not scored.
    """
    return perplexity_of(sequence_nll(model, blocks, batch_size, pad_token_id))


def perplexity_of(scores: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The perplexity of a :func:`sequence_nll` result (all its sequences together)."""
    nll, tokens = scores
    return math.exp(float(nll.sum()) / max(int(tokens.sum()), 1))


def perplexity_ratio_interval(reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor],
                              level: float = 0.95, draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of ``perplexity(other) / perplexity(reference)`` over the evaluation sequences.

    Both arguments are :func:`sequence_nll` results on the same blocks. Each draw resamples the sequences with
    replacement and takes the ratio on the same draw for both models, so the interval says how much the ratio
    depends on which text was evaluated (not on the conversion's own randomness, such as the calibration draw).
    """
    (ref_nll, ref_tokens), (nll, tokens) = reference, other
    if ref_nll.shape != nll.shape or not torch.equal(ref_tokens, tokens):
        raise ValueError("perplexity_ratio_interval needs sequence_nll results of the same blocks")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(nll), (draws, len(nll)), generator=gen)
    log_ratio = (nll - ref_nll)[pick].sum(-1) / tokens[pick].sum(-1).clamp_min(1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(log_ratio, torch.tensor([tail, 1 - tail], dtype=log_ratio.dtype)).exp().tolist()
    return lo, hi


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
