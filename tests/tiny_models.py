"""Tiny random causal LMs built from configs, one per architecture-table family (no network)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
HEADS = 4

_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
                   num_key_value_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=256,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> config kwargs. Families with optional key norms switch them on so that the norms are exercised.
TINY_CONFIG_KWARGS: dict[str, dict] = {
    **{f: dict(_LLAMA_LIKE) for f in ("llama", "mistral", "qwen2", "granite", "starcoder2", "olmo", "olmo2",
                                      "smollm3", "glm", "phi3", "exaone4")},
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "helium": dict(_LLAMA_LIKE, head_dim=16),
    "ministral": dict(_LLAMA_LIKE, head_dim=16),
    "gemma": dict(_LLAMA_LIKE, head_dim=16),
    "gemma2": dict(_LLAMA_LIKE, head_dim=16),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16),
    "cohere": dict(_LLAMA_LIKE, use_qk_norm=True),
    "stablelm": dict(_LLAMA_LIKE, qk_layernorm=True),
    "phi": dict(_LLAMA_LIKE, qk_layernorm=True, partial_rotary_factor=0.5),
    "mixtral": dict(_LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": dict(_LLAMA_LIKE, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(_LLAMA_LIKE, head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=HEADS, n_positions=256, vocab_size=VOCAB, bos_token_id=1,
                 eos_token_id=2),
    "gptj": dict(n_embd=64, n_layer=2, n_head=HEADS, n_positions=256, rotary_dim=8, vocab_size=VOCAB,
                 bos_token_id=1, eos_token_id=2),
    "opt": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=HEADS,
                word_embed_proj_dim=64, max_position_embeddings=256, vocab_size=VOCAB, pad_token_id=0,
                bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=128,
                     rotary_pct=0.5, max_position_embeddings=256, vocab_size=VOCAB, bos_token_id=1,
                     eos_token_id=2),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=HEADS, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS, new_decoder_architecture=False,
                   multi_query=False, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=HEADS, n_positions=256, multi_query=False, vocab_size=VOCAB,
                        bos_token_id=1, eos_token_id=2),
}


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**TINY_CONFIG_KWARGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random causal LM of ``model_type`` in eval mode, fp32, eager-free default attention."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    # Random init leaves some norms at exactly 1/0; perturb every parameter so that merges are not trivially equal.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_tokenizer():
    """A character-level fast tokenizer with < VOCAB ids and a chat template (offline, no files)."""
    import string

    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    return tok
