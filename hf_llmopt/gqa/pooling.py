"""Pure tensor functions for merging key/value heads (no modules, no configs).

Dimension legend::

    H   query heads            KV  key/value heads before conversion      G  key/value heads after conversion
    d   head_dim               D   input features (hidden size)           r  query heads per KV head (H // KV)

Multi-head, grouped-query and multi-query attention (litgpt's picture)::

    MHA  (KV = H)       GQA  (1 < G < H)        MQA  (G = 1)
    q q q q             q q q q                 q q q q
    | | | |             \\ / \\ /                 \\ \\ / /
    k k k k              k    k                    k
"""

from __future__ import annotations

import torch


def contiguous_groups(num_heads: int, num_groups: int) -> list[list[int]]:
    """Split ``range(num_heads)`` into ``num_groups`` contiguous groups of equal size (the GQA paper's grouping)."""
    if num_groups < 1 or num_heads % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {num_heads} heads")
    size = num_heads // num_groups
    return [list(range(g * size, (g + 1) * size)) for g in range(num_groups)]


def merge_kv_heads(weight: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Mean of the KV heads in each group.

    Args:
        weight: per-head tensor of shape ``(KV, ...)`` (a projection weight ``(KV, d, D)``, a bias ``(KV, d)``,
            or a per-head norm weight ``(KV, d)``).
        groups: for each new head, the old KV heads it averages.

    Returns:
        ``(G, ...)`` with ``G = len(groups)``.
    """
    return torch.stack([weight[list(g)].mean(dim=0) for g in groups])


def mean_pool_kv_heads(weight: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Mean-pool a flat K or V projection (Ainslie et al. 2023, section 2.1).

    Args:
        weight: ``(KV_old * d, D)`` weight or ``(KV_old * d,)`` bias of an ``nn.Linear``.
        num_kv_heads: number of heads after pooling, ``G``; must divide ``KV_old``.
        head_dim: ``d``.

    Returns:
        ``(G * d, D)`` (or ``(G * d,)``): each new head is the mean of ``KV_old // G`` contiguous old heads.
    """
    old_heads = weight.shape[0] // head_dim
    per_head = weight.reshape(old_heads, head_dim, *weight.shape[1:])  # (KV_old, d, D)
    pooled = merge_kv_heads(per_head, contiguous_groups(old_heads, num_kv_heads))  # (G, d, D)
    return pooled.reshape(num_kv_heads * head_dim, *weight.shape[1:])


def repeat_kv_heads(weight: torch.Tensor, repeats: int) -> torch.Tensor:
    """Expand ``(KV, ...)`` to ``(KV * repeats, ...)`` so head ``j`` serves the same queries as before (lossless)."""
    return weight.repeat_interleave(repeats, dim=0)


def valid_num_kv_heads(num_heads: int) -> list[int]:
    """Every ``G`` a model with ``num_heads`` query heads can have: the divisors of ``num_heads``."""
    return [g for g in range(1, num_heads + 1) if num_heads % g == 0]
