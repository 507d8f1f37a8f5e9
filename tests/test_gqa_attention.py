"""The packed GQA attention ("gqa_packed") equals eager attention: as a tensor function and inside every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.masking_utils import AttentionMaskInterface

from hf_llmopt import MODEL_TYPE_TO_ARCH_SPEC, convert_to_gqa
from hf_llmopt.gqa.attention import (
    GQA_ATTENTION_NAME,
    PACKED_MAX_QUERY_LENGTH,
    packed_gqa_attention,
    register_gqa_attention,
)
from tiny_models import HEADS, TINY_CONFIG_KWARGS, tiny_model

# One tolerance table: logits and attention outputs, fp32.
ATOL = {"function": 1e-6, "logits": 1e-5}

NATIVE = [f for f, s in MODEL_TYPE_TO_ARCH_SPEC.items() if s.attention.native and f in TINY_CONFIG_KWARGS]


@pytest.fixture(autouse=True, scope="module")
def registered_single_thread():
    # Tiny ops on a shared 2-core machine: OpenMP synchronisation between 2 threads costs more than the math.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    register_gqa_attention()
    yield
    torch.set_num_threads(threads)


def naive_attention(query, key, value, mask, scaling, softcap=None):
    """Ten-line reference: repeat K/V per query head (transformers' repeat_kv order), eager softmax."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ value).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("mask_kind", ["none", "bool_shared", "bool_per_head", "float_shared"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_packed_attention_matches_naive(kv_heads, q_len, mask_kind, softcap):
    torch.manual_seed(0)
    batch, heads, kv_len, dim = 3, 6, 11, 8
    query = torch.randn(batch, heads, q_len, dim)
    key, value = torch.randn(batch, kv_heads, kv_len, dim), torch.randn(batch, kv_heads, kv_len, dim)
    mask_heads = heads if mask_kind == "bool_per_head" else 1
    bool_mask = torch.rand(batch, mask_heads, q_len, kv_len) > 0.3
    bool_mask[..., -1] = True  # no fully masked row, where references may legitimately disagree
    mask = {"none": None, "float_shared": torch.where(bool_mask, 0.0, -1e4)}.get(mask_kind, bool_mask)
    got = packed_gqa_attention(query, key, value, mask, dim**-0.5, softcap=softcap)
    want = naive_attention(query, key, value, mask, dim**-0.5, softcap=softcap)
    assert got.shape == (batch, q_len, heads, dim)
    torch.testing.assert_close(got, want, atol=ATOL["function"], rtol=0)


def test_packing_uses_repeat_kv_head_order():
    """Query head h must read KV head h // R: give each KV head a distinct constant value and check who gets it."""
    batch, heads, kv_heads, dim = 1, 6, 2, 4
    key = torch.zeros(batch, kv_heads, 3, dim)
    value = torch.arange(kv_heads, dtype=torch.float32)[None, :, None, None].expand(batch, kv_heads, 3, dim)
    out = packed_gqa_attention(torch.randn(batch, heads, 1, dim), key, value, None, 1.0)
    assert out[0, 0, :, 0].tolist() == [h // (heads // kv_heads) for h in range(heads)]


def test_registered_in_both_interfaces():
    assert register_gqa_attention() == GQA_ATTENTION_NAME
    assert GQA_ATTENTION_NAME in AttentionInterface._global_mapping
    # Without a mask builder of the same name transformers skips mask creation, silently ignoring padding.
    assert GQA_ATTENTION_NAME in AttentionMaskInterface._global_mapping


def _model(family: str, kv_heads: int):
    kv = {MODEL_TYPE_TO_ARCH_SPEC[family].attention.kv_heads_attr: kv_heads}
    return tiny_model(family, **kv)


@torch.no_grad()
def _prefill_and_decode(model, impl: str, ids, mask, cache_kind: str, chunks: list[int]):
    """Logits of a prefill then decode chunks (lengths ``chunks``) through one cache, with a padding mask."""
    model.set_attn_implementation(impl)
    total = ids.shape[1]
    cache = DynamicCache(config=model.config) if cache_kind == "dynamic" else StaticCache(model.config, total)
    out, start = [], 0
    for length in chunks:
        end = start + length
        out.append(model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], cache=cache,
                         use_cache=True).logits)
        start = end
    return torch.cat(out, dim=1)


CASES = {
    # long padded prefill (sdpa path unless soft-capped), then one-token steps and a 3-token chunk (packed path)
    "padded_prefill_then_decode": ([PACKED_MAX_QUERY_LENGTH + 4, 1, 1, 3, 1], True),
    # short unpadded prefill: transformers drops the causal mask, the packed path must rebuild it
    "short_prefill_no_mask": ([6, 1, 2], False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", NATIVE)
def test_family_logits_equal_eager(family, case):
    chunks, padded = CASES[case]
    model = _model(family, kv_heads=HEADS // 2)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, sum(chunks)))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # left padding in row 0
    want = _prefill_and_decode(model, "eager", ids, mask, "dynamic", chunks)
    got = _prefill_and_decode(model, GQA_ATTENTION_NAME, ids, mask, "dynamic", chunks)
    keep = mask.bool()  # padding positions' outputs are arbitrary in every implementation
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL["logits"], rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_static_cache_decode_equals_eager(family):
    model = _model(family, kv_heads=1)
    torch.manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    chunks = [8, 1, 1, 2]
    want = _prefill_and_decode(model, "eager", ids, mask, "static", chunks)
    got = _prefill_and_decode(model, GQA_ATTENTION_NAME, ids, mask, "static", chunks)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL["logits"], rtol=0)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@torch.no_grad()
def test_mqa_conversion_generates_like_eager(cache_implementation):
    """An MQA-converted model generates the same greedy tokens with packed attention as with eager."""
    mqa = convert_to_gqa(tiny_model("llama"), 1)
    ids = torch.randint(3, mqa.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    outs = {}
    for impl in ("eager", GQA_ATTENTION_NAME):
        mqa.set_attn_implementation(impl)
        outs[impl] = mqa.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, cache_implementation=cache_implementation)
    assert torch.equal(outs["eager"].sequences, outs[GQA_ATTENTION_NAME].sequences)
    for a, b in zip(outs["eager"].logits, outs[GQA_ATTENTION_NAME].logits):
        torch.testing.assert_close(b, a, atol=ATOL["logits"], rtol=0)


def test_short_queries_never_reach_sdpa_expansion(monkeypatch):
    """Queries up to PACKED_MAX_QUERY_LENGTH take the packed path (no repeat_kv, no enable_gqa); longer go to sdpa."""
    import transformers.integrations.sdpa_attention as sdpa_module

    from hf_llmopt.gqa.attention import gqa_packed_attention_forward

    calls = []
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **k: calls.append(a[1].shape) or (None, None))
    module = torch.nn.Module()
    module.is_causal = True
    key = value = torch.randn(2, 1, 40, 8)
    for q_len in (1, PACKED_MAX_QUERY_LENGTH, PACKED_MAX_QUERY_LENGTH + 1):
        out, _ = gqa_packed_attention_forward(module, torch.randn(2, 4, q_len, 8), key, value, None, scaling=0.3)
        assert (out is None) == (q_len > PACKED_MAX_QUERY_LENGTH)
    assert calls == [(2, 4, PACKED_MAX_QUERY_LENGTH + 1, 8)]


@torch.no_grad()
def test_selectable_at_load_time():
    """Registered names are accepted wherever transformers takes attn_implementation, not only after loading."""
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_key_value_heads=1),
                                             attn_implementation=GQA_ATTENTION_NAME)
    assert model.config._attn_implementation == GQA_ATTENTION_NAME
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    packed = model(ids).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(packed, model(ids).logits, atol=ATOL["logits"], rtol=0)
