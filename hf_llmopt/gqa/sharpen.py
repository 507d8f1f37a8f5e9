"""One logit scale for a converted model's attention, chosen on the calibration text by KL to the original.

Fitting the merged keys by least squares shrinks the attention logits: a least-squares prediction has less variance
than what it predicts (the part in which a group's heads differ is dropped), so the converted attention is flatter
than the original, and the layer-wise stage, which also minimises a squared error, shrinks them again. Local
criteria do not see this. Measured on SmolLM2-135M at 3 -> 1 KV heads, per head on the calibration text, the scale
that best reproduces the original attention distributions (KL) or the block outputs (squared error) is below 1 in
most heads and makes held-out perplexity worse (3.43x / 3.84x of the original chat / prose against 3.36x / 3.61x),
while one scale of 1.2 on all queries makes it better (held-out 4,096 tokens each: 3.05x / 3.31x against 3.25x /
3.61x). So the scale is searched on what matters, the whole model's next-token distributions: the KL from the
original's, on the first :data:`SEARCH_TOKENS` calibration tokens, one forward pass per candidate. An exact
conversion keeps the scale 1 (its KL is 0 there). On SmolLM2 it picks 1.3 after the closed form (held-out 3.18x /
3.29x of the original's chat / prose perplexity, against 3.36x / 3.61x) and about 1.04 more after the layer-wise
stage (1.06-1.09 before that stage's drift target).

The original's next-token distributions are kept as their top :data:`TOP_K` probabilities and the rest lumped into
one outcome (a few MB instead of tokens x vocabulary); the KL between these coarsened distributions is zero exactly
when the full one is on that support.

Scaling the queries of every head by ``s`` multiplies every logit by ``s`` (a softmax temperature of ``1 / s``); it
is written into the query projection, so the checkpoint stays a plain model of its family.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..architectures import ArchSpec
from ..evaluation import eval_mode
from .convert import rewrite_attention

SEARCH_TOKENS = 4096  # calibration tokens the KL of each candidate scale is measured on
SEARCH_STEP = 0.1  # candidates are 1, 1 +- step, 1 +- 2 step, ... in the direction that helps, then one refinement
MAX_CANDIDATES = 10
TOP_K = 64
BATCH_SIZE = 8


def scale_attention_logits(model: nn.Module, spec: ArchSpec, factor: float) -> None:
    """Multiply every attention logit of ``model`` by ``factor`` (in place, through the query projections)."""
    rewrite_attention(model, spec, lambda w: w.replace(
        q_weight=w.q_weight * factor, q_bias=None if w.q_bias is None else w.q_bias * factor))


def _log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)


def _with_tail(top: torch.Tensor) -> torch.Tensor:
    """``(..., k)`` log-probabilities -> ``(..., k + 1)`` with the log of the remaining mass appended."""
    rest = -torch.expm1(torch.logsumexp(top, dim=-1, keepdim=True).clamp_max(0.0))
    return torch.cat([top, rest.clamp_min(1e-30).log()], dim=-1)


class ReferenceKL:
    """Mean per-token KL from ``reference``'s (coarsened) next-token distributions on ``blocks`` to a model's.

    The reference runs once, here, on the first :data:`SEARCH_TOKENS` tokens of ``blocks``; every search that
    reuses this object (after the closed form, after the layer-wise stage) only runs the converted model.
    """

    @torch.no_grad()
    def __init__(self, reference: nn.Module, blocks: torch.Tensor):
        blocks = blocks[: max(1, SEARCH_TOKENS // blocks.shape[1])]
        self.tokens = int(blocks.numel())
        self.batches = list(blocks.split(BATCH_SIZE))
        self.targets = []  # per batch: (log-probabilities with tail, indices) of the reference's top-k
        with eval_mode(reference):
            for batch in self.batches:
                top, index = _log_probs(reference, batch).topk(min(TOP_K, reference.config.get_text_config(
                    ).vocab_size), dim=-1)
                self.targets.append((_with_tail(top), index))

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        with eval_mode(model):
            for batch, (ref, index) in zip(self.batches, self.targets):
                mine = _with_tail(_log_probs(model, batch).gather(-1, index))
                total += float((ref.exp() * (ref - mine)).sum())
                count += ref.shape[0] * ref.shape[1]
        return total / max(count, 1)


def fit_logit_scale(model: nn.Module, spec: ArchSpec, target: ReferenceKL) -> dict:
    """Scale ``model``'s attention logits by the factor whose next-token distributions are closest to the
    reference's (``target``), in place.

    Walks from 1 in steps of :data:`SEARCH_STEP` in the direction that lowers the KL until it rises again, then
    tries the vertex of the parabola through the best candidate and its two neighbours (kept only if it is better
    by more than 0.1% and 1e-7 nats).

    Returns:
        For the conversion record: ``logit_scale`` (1.0 when nothing helped), each candidate's KL, the tokens
        and the seconds spent (the reference's pass is not in them: :class:`ReferenceKL` runs it once).
    """
    start = time.perf_counter()
    current = 1.0
    tried: dict[float, float] = {}

    def loss(scale: float) -> float:
        nonlocal current
        scale = round(scale, 4)
        if scale not in tried:
            scale_attention_logits(model, spec, scale / current)
            current = scale
            tried[scale] = target(model)
        return tried[scale]

    best = 1.0
    loss(best)
    for direction in (1.0, -1.0):
        while len(tried) < MAX_CANDIDATES and best + direction * SEARCH_STEP > 0:
            candidate = round(best + direction * SEARCH_STEP, 4)
            if loss(candidate) >= tried[best]:
                break
            best = candidate
        if best != 1.0:
            break  # this direction helped: the other one cannot (the KL rose at its first step)
    left, right = round(best - SEARCH_STEP, 4), round(best + SEARCH_STEP, 4)
    if left in tried and right in tried:
        y0, y1, y2 = tried[left], tried[best], tried[right]
        curvature = y0 - 2 * y1 + y2
        if curvature > 0:
            vertex = round(best + 0.5 * SEARCH_STEP * (y0 - y2) / curvature, 4)
            if loss(vertex) < y1 - 1e-3 * abs(y1) - 1e-7:  # not for noise (an exact conversion: KL ~ 0)
                best = vertex
    scale_attention_logits(model, spec, best / current)
    return {
        "logit_scale": best,
        "logit_scale_kl": {f"{s:g}": round(v, 5) for s, v in sorted(tried.items())},
        "logit_scale_tokens": target.tokens,
        "logit_scale_seconds": round(time.perf_counter() - start, 2),
    }
