"""OPT attention with ``G`` key/value heads (positions are learned embeddings added outside attention)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import OPTAttention
from transformers.utils.deprecation import deprecate_kwarg

from .base import GQAAttentionMixin, grouped_eager_attention


class OPTGQAAttention(GQAAttentionMixin, OPTAttention):
    """:class:`~transformers.OPTAttention` caching ``G`` key/value heads (``out_proj`` unchanged)."""

    def __init__(self, config, layer_idx=None, **kwargs):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.enable_bias = config.enable_bias
        self.layer_idx = layer_idx
        self.head_dim = self.embed_dim // self.num_heads
        self.is_causal = True
        self.scaling = self.head_dim**-0.5

        self._init_gqa_projections(config, self.embed_dim, self.num_heads, self.head_dim, bias=self.enable_bias)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=self.enable_bias)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, tgt_len, _ = hidden_states.size()
        query_states, key_states, value_states = self._project_qkv(hidden_states, self.head_dim)
        # OPT scales the queries before the product (and calls the kernel with scaling=1.0), as the original does.
        query_states = query_states * self.scaling

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, grouped_eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=1.0,
            **kwargs,
        )

        attn_output = attn_output.reshape(bsz, tgt_len, -1).contiguous()
        attn_output = self.out_proj(attn_output)
        return attn_output, attn_weights
