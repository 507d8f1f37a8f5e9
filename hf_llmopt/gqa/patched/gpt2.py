"""GPT-2 attention with ``G`` key/value heads (the fused Conv1D ``c_attn`` becomes separate q/k/v projections)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import maybe_autocast

from .base import GQAAttentionMixin, grouped_context, grouped_eager_attention

# GPT-2's eager path keeps the softmax in the scores' dtype.
gpt2_grouped_eager_attention = partial(grouped_eager_attention, softmax_in_fp32=False)


class GPT2GQAAttention(GQAAttentionMixin, GPT2Attention):
    """:class:`~transformers.GPT2Attention` (self-attention only) caching ``G`` key/value heads.

    Keeps ``c_proj`` as a ``Conv1D``; ``q_proj``/``k_proj``/``v_proj`` are ``nn.Linear`` with biases, like the
    Conv1D columns of ``c_attn`` they replace.
    """

    def __init__(self, config, is_cross_attention=False, layer_idx=None):
        nn.Module.__init__(self)
        if is_cross_attention:
            raise ValueError("GPT2GQAAttention replaces self-attention only; cross-attention keeps GPT2Attention")
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.split_size = self.embed_dim
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention = False
        self.layer_idx = layer_idx
        self.scaling = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(self.layer_idx + 1)

        self._init_gqa_projections(config, self.embed_dim, self.num_heads, self.head_dim, bias=True)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.is_causal = True

    def _upcast_and_reordered_attn(self, query, key, value, attention_mask=None):
        """GPT-2's float32 ``baddbmm`` path with each group's queries folded into one batch entry."""
        bsz, num_heads, q_len, dk = query.size()
        num_kv, k_len = key.shape[1], key.shape[2]
        # (B*G, r*T, S): scaling applied inside baddbmm as GPT-2 does (Megatron-LM's order of operations)
        attn_weights = torch.empty(bsz * num_kv, num_heads // num_kv * q_len, k_len, dtype=torch.float32,
                                   device=query.device)
        with maybe_autocast(query.device.type, enabled=False):
            q = query.reshape(bsz * num_kv, -1, dk)
            k = key.transpose(-1, -2).reshape(bsz * num_kv, dk, k_len)
            attn_weights = torch.baddbmm(attn_weights, q.float(), k.float(), beta=0, alpha=self.scaling)
            attn_weights = attn_weights.reshape(bsz, num_heads, q_len, k_len)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1).type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        attn_output = grouped_context(attn_weights, value).transpose(1, 2)
        return attn_output, attn_weights

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if encoder_hidden_states is not None:
            raise ValueError("GPT2GQAAttention is a self-attention block; it takes no encoder_hidden_states")
        query_states, key_states, value_states = self._project_qkv(hidden_states, self.head_dim)

        if cache is not None:
            curr_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            key_states, value_states = curr_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            attn_output, attn_weights = self._upcast_and_reordered_attn(
                query_states, key_states, value_states, attention_mask
            )
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, gpt2_grouped_eager_attention
            )
            attn_output, attn_weights = attention_interface(
                self,
                query_states,
                key_states,
                value_states,
                attention_mask,
                dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )

        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        attn_output = self.c_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)
        return attn_output, attn_weights
