"""What every patched attention shares: separate q/k/v projections with ``G`` KV heads, and grouped attention math.

Dimension legend (as in :mod:`hf_llmopt.gqa.pooling`)::

    B  batch     T  new tokens (queries)     S  cached + new tokens (keys)
    H  query heads     G  key/value heads     r = H // G query heads per KV head     d  head_dim

Query head ``h`` reads KV head ``h // r`` (transformers' ``repeat_kv`` convention). Instead of repeating keys and
values ``r`` times, the eager paths fold the ``r`` query heads of a group into the query-length axis (gpt-fast's
trick), so a group's queries meet its single key/value head in one matmul and nothing of size ``(B, H, S, d)`` is
materialised::

    query (B, H, T, d) -> (B, G, r*T, d) @ key^T (B, G, d, S) -> scores (B, G, r*T, S) -> (B, H, T, S)

Non-eager backends go through transformers' attention interface, which handles ``G < H`` itself (SDPA's
``enable_gqa`` or its single-token packing, FlashAttention natively) from ``module.num_key_value_groups``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

GQA_RECORD_KEY = "hf_llmopt_gqa"  # the same key as hf_llmopt.gqa.convert.CONFIG_RECORD_KEY


def gqa_record(config) -> dict | None:
    """The conversion record of a config, or ``None`` for a model that was never converted."""
    record = getattr(config, GQA_RECORD_KEY, None)
    return record if record else None


def record_num_key_value_heads(config, num_heads: int) -> int:
    """``G`` from ``config.hf_llmopt_gqa``, checked against the number of query heads."""
    record = gqa_record(config)
    if record is None or "num_key_value_heads" not in record:
        raise ValueError(f"config.{GQA_RECORD_KEY} must be a dict with 'num_key_value_heads', got {record!r}")
    num_kv = int(record["num_key_value_heads"])
    if num_kv < 1 or num_heads % num_kv:
        raise ValueError(f"{GQA_RECORD_KEY}.num_key_value_heads={num_kv} does not divide the {num_heads} query heads")
    return num_kv


def grouped_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``query @ key^T`` per query head, each head using KV head ``h // r``.

    Args:
        query: ``(B, H, T, d)``.
        key: ``(B, G, S, d)``, ``G`` dividing ``H``.

    Returns:
        ``(B, H, T, S)``, equal to ``query @ repeat_kv(key, H // G).transpose(-1, -2)``.
    """
    batch, num_heads, q_len, head_dim = query.shape
    num_kv = key.shape[1]
    folded = query.reshape(batch, num_kv, num_heads // num_kv * q_len, head_dim)  # (B, G, r*T, d)
    return torch.matmul(folded, key.transpose(-1, -2)).view(batch, num_heads, q_len, -1)


def grouped_context(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs @ value`` per query head, each head using KV head ``h // r``.

    Args:
        probs: ``(B, H, T, S)`` attention probabilities.
        value: ``(B, G, S, d)``.

    Returns:
        ``(B, H, T, d)``, equal to ``probs @ repeat_kv(value, H // G)``.
    """
    batch, num_heads, q_len, kv_len = probs.shape
    num_kv = value.shape[1]
    folded = probs.reshape(batch, num_kv, num_heads // num_kv * q_len, kv_len)  # (B, G, r*T, S)
    return torch.matmul(folded, value).view(batch, num_heads, q_len, -1)


def grouped_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    upcast_scores: bool = False,
    softmax_in_fp32: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager attention of the GPT-2/GPT-J/OPT/NeoX/BigCode families with ``G`` KV heads.

    Those families differ only in where they leave float32: GPT-J computes the scores in float32
    (``upcast_scores``), GPT-2 takes the softmax in the scores' dtype (``softmax_in_fp32=False``), the others take it
    in float32. Signature and return convention are transformers' ``eager_attention_forward``.

    Returns:
        ``(attn_output (B, T, H, d), attn_weights (B, H, T, S))``.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if upcast_scores:
        query, key = query.to(torch.float32), key.to(torch.float32)
    attn_weights = grouped_scores(query, key) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32 if softmax_in_fp32 else None).to(value.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = grouped_context(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class GQAAttentionMixin:
    """Separate ``q_proj`` (H*d), ``k_proj`` (G*d), ``v_proj`` (G*d) projections for a patched attention class.

    Each family's patched class lists this mixin before the family's own attention class, so that it still is an
    instance of the original class (transformers' output recorders and ``_init_weights`` match on ``isinstance``).
    """

    hf_llmopt_patched = True

    def _init_gqa_projections(self, config, hidden_size: int, num_heads: int, head_dim: int, bias: bool,
                              linear_cls: type[nn.Linear] = nn.Linear) -> None:
        num_kv = record_num_key_value_heads(config, num_heads)
        self.num_key_value_heads = num_kv
        self.num_key_value_groups = num_heads // num_kv  # read by transformers' SDPA/flash/flex interfaces
        self.q_proj = linear_cls(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = linear_cls(hidden_size, num_kv * head_dim, bias=bias)
        self.v_proj = linear_cls(hidden_size, num_kv * head_dim, bias=bias)

    def _project_qkv(self, hidden_states: torch.Tensor, head_dim: int, transpose: bool = True):
        """Queries ``(B, H, T, d)`` and keys/values ``(B, G, T, d)`` (``(B, T, heads, d)`` if not ``transpose``)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, head_dim)
        states = tuple(proj(hidden_states).view(hidden_shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return tuple(s.transpose(1, 2) for s in states) if transpose else states

    def extra_repr(self) -> str:
        return f"num_key_value_heads={self.num_key_value_heads}, num_key_value_groups={self.num_key_value_groups}"
