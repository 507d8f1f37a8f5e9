"""GPT-J attention with ``G`` key/value heads (interleaved partial rotary on the first ``rotary_dim`` features)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gptj.modeling_gptj import GPTJAttention, apply_rotary_pos_emb

from .base import GQAAttentionMixin, grouped_eager_attention

# GPT-J computes the attention scores in float32.
gptj_grouped_eager_attention = partial(grouped_eager_attention, upcast_scores=True)


def _rotate(states: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rotary_dim: int | None) -> torch.Tensor:
    """GPT-J's rotary embedding on ``(B, T, heads, d)``; only the first ``rotary_dim`` features rotate."""
    if rotary_dim is None:
        return apply_rotary_pos_emb(states, sin, cos)
    rot, passthrough = states[..., :rotary_dim], states[..., rotary_dim:]
    return torch.cat([apply_rotary_pos_emb(rot, sin, cos), passthrough], dim=-1)


class GPTJGQAAttention(GQAAttentionMixin, GPTJAttention):
    """:class:`~transformers.GPTJAttention` caching ``G`` key/value heads (``out_proj`` unchanged)."""

    def __init__(self, config, layer_idx=None):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.embed_dim = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attn_pdrop
        self.rotary_dim = config.rotary_dim

        self._init_gqa_projections(config, self.embed_dim, self.num_attention_heads, self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        # GPT-J rotates in the (B, T, heads, d) layout, then moves heads forward.
        query, key, value = self._project_qkv(hidden_states, self.head_dim, transpose=False)
        sin, cos = position_embeddings
        query = _rotate(query, sin, cos, self.rotary_dim).transpose(1, 2)
        key = _rotate(key, sin, cos, self.rotary_dim).transpose(1, 2)
        value = value.transpose(1, 2)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, gptj_grouped_eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.out_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)
        return attn_output, attn_weights
