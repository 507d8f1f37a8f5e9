"""GPT-NeoX attention with ``G`` key/value heads (rotate-half rotary on the first ``rotary_pct`` of each head)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, apply_rotary_pos_emb

from .base import GQAAttentionMixin, grouped_eager_attention


class GPTNeoXGQAAttention(GQAAttentionMixin, GPTNeoXAttention):
    """:class:`~transformers.GPTNeoXAttention` caching ``G`` key/value heads.

    The fused per-head ``query_key_value`` becomes ``q_proj``/``k_proj``/``v_proj``; ``dense`` is unchanged.
    """

    def __init__(self, config, layer_idx=None):
        nn.Module.__init__(self)
        self.config = config
        self.head_size = config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_dropout
        partial_rotary_factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        self.rotary_ndims = int(self.head_size * partial_rotary_factor)
        self.scaling = self.head_size**-0.5
        self.is_causal = True
        self.layer_idx = layer_idx

        self._init_gqa_projections(config, config.hidden_size, config.num_attention_heads, self.head_size,
                                   bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_past=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query_states, key_states, value_states = self._project_qkv(hidden_states, self.head_size)

        # cos/sin cover the rotary features only; apply_rotary_pos_emb passes the rest through. Keys have G heads,
        # which broadcast against the (B, 1, T, rotary) angles like the H query heads do.
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if layer_past is not None:
            key_states, value_states = layer_past.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, grouped_eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.dense(attn_output)
        return attn_output, attn_weights
