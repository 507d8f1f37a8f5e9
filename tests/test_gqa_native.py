"""GQA conversion of families whose transformers attention expresses fewer KV heads natively.

Parametrised over the architecture table: adding a native family adds its tests.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from hf_llmopt import MODEL_TYPE_TO_ARCH_SPEC, convert_to_gqa
from hf_llmopt._compat import kv_cache_bytes
from hf_llmopt.gqa.convert import get_attention, get_decoder_layers
from hf_llmopt.gqa.layout import read_attention
from tiny_models import HEADS, TINY_CONFIG_KWARGS, tiny_model

NATIVE = sorted(t for t, s in MODEL_TYPE_TO_ARCH_SPEC.items() if s.attention.native)
TOLERANCE = {"identity": 1e-5, "reference": 1e-5, "reload": 0.0}


def test_every_native_family_has_a_tiny_model():
    assert set(NATIVE) <= set(TINY_CONFIG_KWARGS)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row exercises the masks
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def naive_mean_pool(weight: torch.Tensor, old_heads: int, new_heads: int, head_dim: int) -> torch.Tensor:
    """Reference: new head j = mean of the old heads serving query heads of group j (contiguous)."""
    rows = []
    per_new = HEADS // new_heads
    for j in range(new_heads):
        query_heads = range(j * per_new, (j + 1) * per_new)
        olds = [h // (HEADS // old_heads) for h in query_heads]
        rows.append(sum(weight[o * head_dim:(o + 1) * head_dim] for o in olds) / len(olds))
    return torch.cat(rows)


@pytest.mark.parametrize("model_type", NATIVE)
def test_same_number_of_heads_is_identity(model_type):
    model = tiny_model(model_type)
    ids, mask = _inputs()
    converted = convert_to_gqa(model, HEADS)
    torch.testing.assert_close(_logits(converted, ids, mask), _logits(model, ids, mask),
                               atol=TOLERANCE["identity"], rtol=0)


@pytest.mark.parametrize("model_type", NATIVE)
@pytest.mark.parametrize("num_kv", [1, 2])
def test_mean_pool_matches_naive_reference(model_type, num_kv):
    model = tiny_model(model_type)
    spec = MODEL_TYPE_TO_ARCH_SPEC[model_type]
    before = [p.detach().clone() for p in model.parameters()]
    converted = convert_to_gqa(model, num_kv)
    assert converted.config.num_key_value_heads == num_kv
    assert converted.config.hf_llmopt_gqa["method"] == "mean"
    for layer_old, layer_new in zip(get_decoder_layers(model, spec), get_decoder_layers(converted, spec)):
        old = read_attention(get_attention(layer_old, spec), spec.attention, HEADS, HEADS)
        new = read_attention(get_attention(layer_new, spec), spec.attention, HEADS, num_kv)
        d = old.head_dim
        for name in ("k_weight", "v_weight"):
            ref = naive_mean_pool(getattr(old, name).reshape(HEADS * d, -1), HEADS, num_kv, d)
            torch.testing.assert_close(getattr(new, name).reshape(num_kv * d, -1), ref,
                                       atol=TOLERANCE["reference"], rtol=0)
        for name in ("k_bias", "v_bias"):
            if getattr(old, name) is not None:
                ref = naive_mean_pool(getattr(old, name).reshape(-1, 1), HEADS, num_kv, d).reshape(-1)
                torch.testing.assert_close(getattr(new, name).reshape(-1), ref, atol=TOLERANCE["reference"],
                                           rtol=0)
        torch.testing.assert_close(new.q_weight, old.q_weight, atol=0, rtol=0)
        torch.testing.assert_close(new.o_weight, old.o_weight, atol=0, rtol=0)
    # The source model is left untouched.
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert model.config.num_key_value_heads == HEADS


@pytest.mark.parametrize("model_type", NATIVE)
def test_converted_model_generates_with_cache(model_type):
    model = tiny_model(model_type)
    converted = convert_to_gqa(model, 1)
    ids, _ = _inputs()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = converted.generate(ids[:1], use_cache=True, **kwargs)
    without = converted.generate(ids[:1], use_cache=False, **kwargs)
    assert with_cache.shape == (1, ids.shape[1] + 6)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("model_type", NATIVE)
@pytest.mark.parametrize("num_kv", [1, 2])
def test_kv_cache_shrinks_by_g_over_h(model_type, num_kv):
    model = tiny_model(model_type)
    converted = convert_to_gqa(model, num_kv)
    ids, mask = _inputs()
    with torch.no_grad():
        before = kv_cache_bytes(model(input_ids=ids, attention_mask=mask, use_cache=True)["past_key_values"])
        after = kv_cache_bytes(converted(input_ids=ids, attention_mask=mask, use_cache=True)["past_key_values"])
    assert before > 0
    assert after * HEADS == before * num_kv


def test_expansion_repeats_heads_losslessly():
    model = tiny_model("mistral", num_key_value_heads=1)
    ids, mask = _inputs()
    for target in (2, HEADS):
        expanded = convert_to_gqa(model, target)
        assert expanded.config.num_key_value_heads == target
        assert expanded.config.hf_llmopt_gqa["method"] == "repeat"
        torch.testing.assert_close(_logits(expanded, ids, mask), _logits(model, ids, mask),
                                   atol=TOLERANCE["identity"], rtol=0)


def test_gqa_to_mqa_equals_mean_of_query_groups():
    # 4 query heads, 2 KV heads -> 1: the shared head is the mean of the two old heads.
    model = tiny_model("llama", num_key_value_heads=2)
    converted = convert_to_gqa(model, 1)
    layer_old = model.model.layers[0].self_attn
    layer_new = converted.model.layers[0].self_attn
    d = layer_old.head_dim
    k = layer_old.k_proj.weight.detach()
    torch.testing.assert_close(layer_new.k_proj.weight, (k[:d] + k[d:]) / 2, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def reloaded_in_fresh_process(tmp_path_factory):
    """Save every native family converted to G=2, reload them all in ONE process that never imports hf_llmopt."""
    root = tmp_path_factory.mktemp("native_reload")
    ids, mask = _inputs()
    torch.save({"ids": ids, "mask": mask}, root / "inputs.pt")
    expected = {}
    for model_type in NATIVE:
        converted = convert_to_gqa(tiny_model(model_type), 2)
        converted.save_pretrained(root / model_type)
        expected[model_type] = _logits(converted, ids, mask)
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)  # same threads as the test process, so logits can be compared exactly
        x = torch.load({str(root / "inputs.pt")!r})
        for name in {NATIVE!r}:
            m = AutoModelForCausalLM.from_pretrained({str(root)!r} + "/" + name).eval()
            with torch.no_grad():
                logits = m(input_ids=x["ids"], attention_mask=x["mask"]).logits
            torch.save({{"logits": logits, "kv": m.config.num_key_value_heads}}, {str(root)!r} + f"/{{name}}.pt")
        assert "hf_llmopt" not in sys.modules, "the reload process imported hf_llmopt"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, expected


@pytest.mark.parametrize("model_type", NATIVE)
def test_save_reload_without_hf_llmopt(model_type, reloaded_in_fresh_process):
    root, expected = reloaded_in_fresh_process
    assert not list((root / model_type).glob("*.bin"))
    assert (root / model_type / "model.safetensors").is_file()
    out = torch.load(root / f"{model_type}.pt")
    assert out["kv"] == 2
    torch.testing.assert_close(out["logits"], expected[model_type], atol=TOLERANCE["reload"], rtol=0)
