"""Falcon attention with ``G`` key/value heads, whatever the source layout (multi-query, new decoder, per-head).

Falcon's own attention broadcasts keys and values to all ``H`` heads before caching in the new decoder
architecture, so its cache never shrinks; this class caches exactly ``G`` heads in every layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.falcon.modeling_falcon import FalconAttention, FalconLinear, apply_rotary_pos_emb

from .base import GQAAttentionMixin, grouped_context, grouped_scores


class FalconGQAAttention(GQAAttentionMixin, FalconAttention):
    """:class:`~transformers.FalconAttention` (and its FlashAttention-2 variant) caching ``G`` key/value heads.

    ``query_key_value`` becomes ``q_proj``/``k_proj``/``v_proj`` (``FalconLinear``, ``bias=config.bias``);
    ``dense`` is unchanged. Eager and SDPA follow Falcon's own arithmetic; any other ``attn_implementation``
    (``flash_attention_2``, ``flex_attention``) goes through transformers' attention interface.
    """

    def __init__(self, config, layer_idx=None):
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.split_size = self.hidden_size
        self.hidden_dropout = config.hidden_dropout
        self.max_position_embeddings = config.max_position_embeddings
        self.is_causal = True
        self.layer_idx = layer_idx
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.beta = self.inv_norm_factor
        self.new_decoder_architecture = config.new_decoder_architecture
        self.multi_query = config.multi_query

        self._init_gqa_projections(config, self.hidden_size, self.num_heads, self.head_dim, bias=config.bias,
                                   linear_cls=FalconLinear)
        self.num_kv_heads = self.num_key_value_heads
        self.dense = FalconLinear(self.hidden_size, self.hidden_size, bias=config.bias)
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def _merge(self, attn_output: torch.Tensor) -> torch.Tensor:
        """``(B, T, H, d)`` -> ``(B, T, H*d)``."""
        return attn_output.reshape(*attn_output.shape[:2], self.num_heads * self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        alibi: torch.Tensor | None,
        attention_mask: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        layer_past=None,
        use_cache: bool = False,
        output_attentions: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, query_length, _ = hidden_states.shape
        query_layer, key_layer, value_layer = self._project_qkv(hidden_states, self.head_dim)

        if alibi is None:
            cos, sin = position_embeddings
            query_layer, key_layer = apply_rotary_pos_emb(query_layer, key_layer, cos, sin)

        if layer_past is not None:
            key_layer, value_layer = layer_past.update(key_layer, value_layer, self.layer_idx)
        kv_length = key_layer.shape[-2]

        implementation = self.config._attn_implementation
        if implementation not in ("eager", "sdpa") and not output_attentions:
            if alibi is not None:
                raise ValueError(f"`alibi` is not supported with attn_implementation={implementation!r}")
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None)
            attn_output, _ = attention_interface(
                self, query_layer, key_layer, value_layer, attention_mask, position_ids=position_ids,
                dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.inv_norm_factor,
            )
            return self.dense(self._merge(attn_output)), None

        if implementation == "sdpa" and not output_attentions:
            # Falcon calls SDPA with its default scale; the interface adds GQA (enable_gqa or single-token packing).
            # With ALiBi the bias is already folded into attention_mask by FalconModel.
            dropout = self.attention_dropout.p if (alibi is not None and self.training) else 0.0
            attn_output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](
                self, query_layer, key_layer, value_layer, attention_mask, dropout=dropout, scaling=None
            )
            return self.dense(self._merge(attn_output)), None

        if alibi is None:
            attention_scores = grouped_scores(query_layer, key_layer)
            attention_scores /= math.sqrt(self.head_dim)
            if attention_mask is not None:
                attention_scores = attention_scores + attention_mask
            attention_scores = F.softmax(attention_scores, dim=-1, dtype=hidden_states.dtype)
            # Falcon applies no attention dropout on this path.
            attn_output = grouped_context(attention_scores, value_layer).transpose(1, 2)
            return self.dense(self._merge(attn_output)), attention_scores

        attention_scores = grouped_scores(query_layer, key_layer)  # (B, H, T, S)
        if attention_scores.dtype in (torch.float16, torch.bfloat16):
            attention_scores = attention_scores.to(torch.float32)
        attention_logits = attention_scores + alibi.view(batch_size, self.num_heads, 1, -1)
        attention_logits *= self.inv_norm_factor
        if attention_mask is not None:
            attention_logits = attention_logits + attention_mask
        attention_probs = F.softmax(attention_logits, dim=-1, dtype=hidden_states.dtype)
        attention_probs = self.attention_dropout(attention_probs)
        attn_output = grouped_context(attention_probs.view(batch_size, self.num_heads, query_length, kv_length),
                                      value_layer)
        attn_output = self._merge_heads(attn_output.flatten(0, 1))
        return self.dense(attn_output), attention_probs
