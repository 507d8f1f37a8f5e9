"""Rebalance the scales of a converted attention block before training it (the function is unchanged).

Attention has two scale freedoms per KV head ``j`` and its query group ``G_j``::

    scores  q_h . k_j   unchanged by  q_h -> q_h / s,  k_j -> s k_j        (RoPE is linear: it commutes with s)
    output  o_h A v_j   unchanged by  v_j -> t v_j,    o_h -> o_h / t      (attention rows sum to 1: biases too)

A closed-form conversion can land far from the balance a trained model has: the data-aware fit of SmolLM2-135M at
3 -> 1 KV heads leaves output projections 10-50x larger (RMS) than the original's and values 2-3x smaller. Adam
moves every weight by about the learning rate whatever its scale, so the small factor of an unbalanced pair changes
by a large relative amount: layer-wise fitting and distillation then diverge. Choosing ``s`` and ``t`` so that both
factors of each pair have the same RMS (as weight equalization does before quantization) removes that, exactly.

Key scales are left alone when the family normalises queries or keys after projection (qwen3 ``q_norm``/``k_norm``,
...): a norm absorbs the scale of one factor but not of the other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures import ArchSpec, get_arch_spec
from .convert import rewrite_attention
from .layout import AttentionWeights


def _rms(t: torch.Tensor, dims) -> torch.Tensor:
    return t.float().pow(2).mean(dim=dims).sqrt().clamp_min(1e-12)


def balance_attention_weights(w: AttentionWeights, scale_keys: bool = True) -> AttentionWeights:
    """Per KV head, equalise the RMS of (values, output slices) and of (shared key, group queries).

    Shapes (canonical, :mod:`hf_llmopt.gqa.layout`): ``q (H, d, D)``, ``k, v (KV, d, D)``, ``o (D_out, H, d)``;
    query head ``h`` reads KV head ``h // (H // KV)``.
    """
    kv, n = w.num_kv_heads, w.num_heads // w.num_kv_heads
    o = w.o_weight.reshape(w.o_weight.shape[0], kv, n, -1)  # (D_out, KV, n, d)
    t = (_rms(o, (0, 2, 3)) / _rms(w.v_weight, (1, 2))).sqrt()  # (KV,)
    changes = {
        "v_weight": w.v_weight * t[:, None, None],
        "v_bias": None if w.v_bias is None else w.v_bias * t[:, None],
        "o_weight": (o / t[None, :, None, None]).reshape(w.o_weight.shape),
    }
    if scale_keys:
        q = w.q_weight.reshape(kv, n, *w.q_weight.shape[1:])  # (KV, n, d, D)
        s = (_rms(q, (1, 2, 3)) / _rms(w.k_weight, (1, 2))).sqrt()  # (KV,)
        per_query = s.repeat_interleave(n)  # (H,)
        changes.update(
            k_weight=w.k_weight * s[:, None, None],
            k_bias=None if w.k_bias is None else w.k_bias * s[:, None],
            q_weight=w.q_weight / per_query[:, None, None],
            q_bias=None if w.q_bias is None else w.q_bias / per_query[:, None],
        )
    return w.replace(**{k: (v.to(getattr(w, k).dtype) if v is not None else None) for k, v in changes.items()})


@torch.no_grad()
def balance_attention_scales(model: nn.Module, arch_spec: ArchSpec | None = None) -> None:
    """Apply :func:`balance_attention_weights` to every attention block of ``model``, in place."""
    spec = get_arch_spec(model, arch_spec)
    scale_keys = spec.attention.kv_norm is None and spec.attention.q_norm is None
    rewrite_attention(model, spec, lambda w: balance_attention_weights(w, scale_keys))
