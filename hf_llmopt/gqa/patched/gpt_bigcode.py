"""GPT-BigCode attention with any ``G`` key/value heads (transformers' class allows only 1 or ``H``)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_bigcode.modeling_gpt_bigcode import GPTBigCodeAttention

from .base import GQAAttentionMixin, grouped_eager_attention


class GPTBigCodeGQAAttention(GQAAttentionMixin, GPTBigCodeAttention):
    """:class:`~transformers.GPTBigCodeAttention` (self-attention only) caching ``G`` key/value heads.

    ``c_attn`` becomes ``q_proj``/``k_proj``/``v_proj``; ``c_proj`` is unchanged. The eager path groups queries
    instead of calling ``repeat_kv``, so keys and values are never expanded to ``H`` heads.
    """

    def __init__(self, config, is_cross_attention=False, layer_idx=None):
        nn.Module.__init__(self)
        if is_cross_attention:
            raise ValueError("GPTBigCodeGQAAttention replaces self-attention only")
        self.config = config
        self.mask_value = None
        self.multi_query = config.multi_query
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.split_size = self.embed_dim
        self.is_causal = True
        self.scale_attn_weights = config.scale_attn_weights
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.is_cross_attention = False
        self.layer_idx = layer_idx
        self.attention_softmax_in_fp32 = config.attention_softmax_in_fp32
        self.scale_attention_softmax_in_fp32 = (
            config.scale_attention_softmax_in_fp32 and config.attention_softmax_in_fp32
        )
        self.attn_pdrop = config.attn_pdrop

        self._init_gqa_projections(config, self.embed_dim, self.num_heads, self.head_dim, bias=True)
        self.kv_heads = self.num_key_value_heads
        self.kv_dim = self.kv_heads * self.head_dim
        self.c_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_past=None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if encoder_hidden_states is not None:
            raise ValueError("GPTBigCodeGQAAttention is a self-attention block; it takes no encoder_hidden_states")
        input_shape = hidden_states.shape[:-1]
        query, key, value = self._project_qkv(hidden_states, self.head_dim)

        if layer_past is not None:
            curr_cache = layer_past.self_attention_cache if isinstance(layer_past, EncoderDecoderCache) else layer_past
            key, value = curr_cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, grouped_eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attn_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.c_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)
        return attn_output, attn_weights
