"""Grouped-query attention that never expands the key/value heads: ``attn_implementation="gqa_packed"``.

In GQA each key/value head serves ``R = H // KV`` query heads (query head ``h`` reads KV head ``h // R``, as in
transformers' ``repeat_kv``). Rather than repeating K/V ``R`` times, the queries of a group are stacked as extra
query rows against their single K/V head::

    query (B, H, q, d) --view--> (B, KV, R * q, d)      row r * q + i  =  query head g * R + r, position i
    key   (B, KV, S, d)                                  used as is: read once per group, never copied
    out   (B, KV, R * q, d) --view--> (B, H, q, d) --> (B, q, H, d)

For decoding (``q`` small) this turns ``B * H`` matrix-vector products over the cache into ``B * KV`` small
matrix products, so every cached byte is read once per group instead of once per query head: fewer KV heads read
proportionally fewer bytes (the FLOPs, set by H, do not change). transformers' own ``sdpa`` packs only
single-token queries that come with a mask. Without one (the usual ``DynamicCache`` decode, no padding) it asks
torch for ``enable_gqa``, whose CPU kernel still runs one query head at a time (for MQA at batch 16 x 2k context,
1.4x slower than packed); with a mask and ``q > 1`` (speculative verification, chunked decode) it materialises
the repeated K/V, as eager attention (the only choice of soft-capped models such as gemma2) always does.

The packed path feeds torch's fused ``scaled_dot_product_attention`` kernel an eager-style additive mask (0 or
``finfo.min``), or, for soft-capped models (gemma2), computes eager's math explicitly; results match ``eager`` and
``sdpa`` to rounding. Long queries (prefill) go to transformers' ``sdpa`` unchanged.

Dimension legend: B batch, H query heads, KV key/value heads, R = H // KV, q query length, S key length, d head dim.

Registration goes through transformers' public interfaces only: :func:`register_gqa_attention` adds the function
to ``AttentionInterface`` and ``sdpa``'s mask builder to ``AttentionMaskInterface`` under the same name (without a
mask builder of that name transformers would skip mask creation and padding would be ignored).

Example:
    >>> from hf_llmopt.gqa.attention import register_gqa_attention
    >>> model.set_attn_implementation(register_gqa_attention())  # "gqa_packed"
    >>> out = model.generate(**inputs, cache_implementation="static")  # in-place cache: no per-step copy
"""

from __future__ import annotations

import torch
from torch import nn

GQA_ATTENTION_NAME = "gqa_packed"

# Queries up to this length take the packed path; longer ones (prefill) go to sdpa. Packing needs an explicit
# (R * q, S) mask, as the stacked query blocks no longer form one causal triangle, which rules out the fused
# kernels' is_causal block skipping: negligible for decoding and speculative verification, not for a long prefill.
PACKED_MAX_QUERY_LENGTH = 16


def pack_queries(query: torch.Tensor, num_key_value_heads: int) -> torch.Tensor:
    """(B, H, q, d) -> (B, KV, R * q, d): the R query heads that share a KV head become rows of one matrix."""
    batch, heads, q_len, dim = query.shape
    return query.reshape(batch, num_key_value_heads, (heads // num_key_value_heads) * q_len, dim)


def pack_mask(mask: torch.Tensor | None, num_key_value_heads: int, groups: int) -> torch.Tensor | None:
    """Reshape a (B|1, 1|H, q, S) mask to broadcast against packed scores (B|1, 1|KV, R * q, S).

    A mask shared by all heads is repeated over the R stacked query blocks (a view when q == 1); a per-head mask is
    regrouped exactly like the queries.
    """
    if mask is None:
        return None
    batch, mask_heads, q_len, kv_len = mask.shape
    if mask_heads == 1:
        if q_len == 1:
            return mask  # (B, 1, 1, S) already broadcasts over the R rows
        return mask[:, :, None].expand(batch, 1, groups, q_len, kv_len).reshape(batch, 1, groups * q_len, kv_len)
    return mask.reshape(batch, num_key_value_heads, groups * q_len, kv_len)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Upper-left aligned causal mask (1, 1, q, S), which is what sdpa's ``is_causal=True`` computes."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()[None, None]


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = attend) as eager's additive one: 0 or ``finfo.min``, never -inf.

    With ``finfo.min`` a fully masked row (a padding query) gets uniform weights, exactly as in eager attention,
    where -inf would give NaN (math) or zeros (fused kernels).
    """
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)


def packed_gqa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention computed per KV head, with the query heads of a group stacked as rows of one query matrix.

    Args:
        query: (B, H, q, d).
        key, value: (B, KV, S, d) and (B, KV, S, dv), KV dividing H.
        attention_mask: ``None``, a boolean mask (True = attend) or an additive float mask, of shape
            (B|1, 1|H, q, S).
        scaling: multiplier of the scores (usually ``d ** -0.5``).
        softcap: if set, scores become ``tanh(scores / softcap) * softcap`` before masking (gemma2).
        dropout: dropout probability on the attention weights (pass 0.0 in eval mode).

    Returns:
        (B, q, H, dv), the layout attention modules reshape into hidden states.
    """
    batch, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    packed = pack_queries(query, kv_heads)                                       # (B, KV, R*q, d)
    mask = pack_mask(additive_mask(attention_mask, query.dtype), kv_heads, groups)  # (B|1, 1|KV, R*q|1, S)
    if softcap is None:
        # torch's fused kernel, fed K/V as stored: each cached byte is read once per group, not once per head
        out = nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                         scale=scaling)
    else:
        scores = torch.matmul(packed, key.transpose(2, 3)) * scaling                # (B, KV, R*q, S)
        scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            scores = scores + mask
        weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = nn.functional.dropout(weights, p=dropout, training=dropout > 0)
        out = torch.matmul(weights, value)                                       # (B, KV, R*q, dv)
    return out.reshape(batch, heads, q_len, value.shape[-1]).transpose(1, 2).contiguous()


def gqa_packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: packed GQA for short queries, transformers' sdpa otherwise.

    Receives what every transformers attention module passes (``module.num_key_value_groups`` is not needed: the
    grouping is read from the tensor shapes). Returns ``(attn_output (B, q, H, d), None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if kwargs.get("sinks") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{GQA_ATTENTION_NAME} attention does not support attention sinks")
    unsupported = kwargs.get("position_bias") is not None
    # Soft-capping has no sdpa kernel: such models run eager, so the packed path (same memory as eager) serves all
    # lengths for them.
    if unsupported or (softcap is None and q_len > PACKED_MAX_QUERY_LENGTH):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, softcap=softcap, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if attention_mask is None and q_len > 1 and (is_causal if is_causal is not None else getattr(
            module, "is_causal", True)):
        # transformers drops the mask when sdpa's is_causal can express it (no padding, empty or absent cache)
        attention_mask = causal_mask(q_len, kv_len, query.device)
    out = packed_gqa_attention(query, key, value, attention_mask, scaling, softcap=softcap,
                               dropout=dropout if module.training else 0.0)
    return out, None


def register_gqa_attention(name: str = GQA_ATTENTION_NAME) -> str:
    """Register the packed attention (and sdpa's mask builder) under ``name``; idempotent. Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, gqa_packed_attention_forward)
    # The same mask format as sdpa: boolean (B, 1, q, S), or None when sdpa's is_causal would do.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
