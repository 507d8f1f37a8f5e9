"""BLOOM attention with ``G`` key/value heads (ALiBi biases stay per query head)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.bloom.modeling_bloom import BloomAttention, dropout_add

from .base import GQAAttentionMixin, grouped_context


class BloomGQAAttention(GQAAttentionMixin, BloomAttention):
    """:class:`~transformers.BloomAttention` caching ``G`` key/value heads.

    The fused per-head ``query_key_value`` becomes ``q_proj``/``k_proj``/``v_proj``; ``dense`` is unchanged.
    BLOOM is eager-only in transformers, so this is too.
    """

    def __init__(self, config, layer_idx=None):
        nn.Module.__init__(self)
        self.pretraining_tp = config.pretraining_tp
        self.slow_but_exact = config.slow_but_exact
        self.hidden_size = config.hidden_size
        self.num_heads = config.n_head
        self.head_dim = self.hidden_size // self.num_heads
        self.split_size = self.hidden_size
        self.hidden_dropout = config.hidden_dropout
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.beta = 1.0
        self.layer_idx = layer_idx

        self._init_gqa_projections(config, self.hidden_size, self.num_heads, self.head_dim, bias=True)
        self.dense = nn.Linear(self.hidden_size, self.hidden_size)
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def _alibi_scores(self, alibi: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``beta * alibi + inv_norm * q @ k^T`` in one ``baddbmm`` per group, as BLOOM computes it.

        Args:
            alibi: ``(B*H, 1, S)`` per-query-head biases.
            query: ``(B, H, T, d)``.
            key: ``(B, G, S, d)``.

        Returns:
            ``(B, H, T, S)``.
        """
        batch, num_heads, q_len, head_dim = query.shape
        num_kv, kv_len = key.shape[1], key.shape[2]
        rows = num_heads // num_kv * q_len
        q = query.reshape(batch * num_kv, rows, head_dim)  # (B*G, r*T, d)
        k = key.reshape(batch * num_kv, kv_len, head_dim).transpose(-1, -2)  # (B*G, d, S)
        # the bias of head h = g*r + j sits at rows j*T .. (j+1)*T of group g: (B*G, r, 1, S) -> (B*G, r*T, S)
        bias = alibi.view(batch * num_kv, num_heads // num_kv, 1, kv_len).expand(-1, -1, q_len, -1)
        scores = bias.reshape(batch * num_kv, rows, kv_len).baddbmm(q, k, beta=self.beta, alpha=self.inv_norm_factor)
        return scores.view(batch, num_heads, q_len, kv_len)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_past=None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, q_length, _ = hidden_states.shape
        query_layer, key_layer, value_layer = self._project_qkv(hidden_states, self.head_dim)

        if layer_past is not None:
            key_layer, value_layer = layer_past.update(key_layer, value_layer, self.layer_idx)

        attn_weights = self._alibi_scores(alibi, query_layer, key_layer)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attention_probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_layer.dtype)
        attention_probs = self.attention_dropout(attention_probs)

        # (B, H, T, d) -> (B*H, T, d) for BLOOM's own head merge
        context_layer = grouped_context(attention_probs, value_layer).reshape(batch_size * self.num_heads, q_length, -1)
        context_layer = self._merge_heads(context_layer)

        if self.pretraining_tp > 1 and self.slow_but_exact:
            slices = self.hidden_size / self.pretraining_tp
            output_tensor = torch.zeros_like(context_layer)
            for i in range(self.pretraining_tp):
                output_tensor = output_tensor + F.linear(
                    context_layer[:, :, int(i * slices) : int((i + 1) * slices)],
                    self.dense.weight[:, int(i * slices) : int((i + 1) * slices)],
                )
        else:
            output_tensor = self.dense(context_layer)

        output_tensor = dropout_add(output_tensor, residual, self.hidden_dropout, self.training)
        return output_tensor, attention_probs
