"""GQA conversion of families whose transformers attention cannot express fewer KV heads (hf_llmopt.gqa.patched).

Parametrised over the architecture table's non-native entries (and each layout a family has): adding a family
adds its tests.
"""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_llmopt import MODEL_TYPE_TO_ARCH_SPEC, convert_to_gqa
from hf_llmopt._compat import kv_cache_bytes
from hf_llmopt.gqa import patched
from hf_llmopt.gqa.convert import get_attention, get_decoder_layers, num_heads_of
from hf_llmopt.gqa.layout import FUSED_READERS
from tiny_models import HEADS, TINY_CONFIG_KWARGS, tiny_config, tiny_model

NON_NATIVE = sorted(t for t, s in MODEL_TYPE_TO_ARCH_SPEC.items() if not s.attention.native)
TOLERANCE = {"identity": 1e-5, "reference": 1e-5, "reload": 0.0}

# Every storage layout / attention path a family has; families not listed have one.
FAMILY_VARIANTS = {
    "gpt2": {"": {}, "upcast": dict(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)},
    "falcon": {"per_head": {}, "multi_query": dict(multi_query=True),
               "new_arch": dict(new_decoder_architecture=True, num_kv_heads=2), "alibi": dict(alibi=True)},
    "gpt_bigcode": {"mha": dict(multi_query=False), "multi_query": dict(multi_query=True)},
}
CASES = [pytest.param(t, kw, id=f"{t}-{v}" if v else t)
         for t in NON_NATIVE for v, kw in FAMILY_VARIANTS.get(t, {"": {}}).items()]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread is ~50x faster than two threads contending on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _supports_sdpa(model_type, overrides):
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa


CASES_BY_ATTN = [pytest.param(*p.values, attn, id=f"{p.id}-{attn}") for p in CASES for attn in ("eager", "sdpa")
                 if attn == "eager" or _supports_sdpa(*p.values)]


def _inputs(seed=0, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row exercises the masks
    return ids, mask


def _logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs)


def _attentions(model):
    spec = MODEL_TYPE_TO_ARCH_SPEC[model.config.model_type]
    return [get_attention(layer, spec) for layer in get_decoder_layers(model, spec)]


def naive_gqa_heads(kv_heads: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Reference: new KV head g = mean, over the query heads of contiguous group g, of the KV head each one read.

    ``kv_heads`` is ``(KV, d, ...)`` (K or V rows of every original KV head); returns ``(G, d, ...)``.
    """
    per_query = [kv_heads[h // (num_heads // kv_heads.shape[0])] for h in range(num_heads)]
    size = num_heads // num_groups
    return torch.stack([sum(per_query[g * size:(g + 1) * size]) / size for g in range(num_groups)])


def _kv_locations(module, spec, num_heads, num_kv, head_dim):
    """For K and V: (projection name, (KV, d) output-feature indices) in the ORIGINAL module's storage.

    The fused readers are pure index arithmetic, so running them on a weight holding each row's own index tells
    where every canonical row lives (the identity tests check that the readers pick the right rows).
    """
    a = spec.attention
    if a.layout == "separate":
        ids = torch.arange(num_kv * head_dim).view(num_kv, head_dim)
        return {"k": (a.k, ids), "v": (a.v, ids)}
    fused = getattr(module, a.qkv)
    conv1d = a.layout == "conv1d_concat"
    index = torch.arange(fused.weight.shape[1 if conv1d else 0], dtype=torch.float64)
    (_, k, v), _ = FUSED_READERS[a.layout](module, index[None] if conv1d else index[:, None], None,
                                           num_heads, num_kv, head_dim)
    return {"k": (a.qkv, k.reshape(num_kv, head_dim).long()), "v": (a.qkv, v.reshape(num_kv, head_dim).long())}


def _rows(linear, ids, conv1d):
    """(KV, d, D) weight rows and (KV, d) bias of output features ``ids``."""
    weight = linear.weight.detach()
    rows = weight[:, ids].permute(1, 2, 0) if conv1d else weight[ids]
    return rows, (linear.bias.detach()[ids] if getattr(linear, "bias", None) is not None else None)


def _reference_model(model, num_groups):
    """The ORIGINAL family model with every KV head's K/V rows replaced by the mean of its new group."""
    spec = MODEL_TYPE_TO_ARCH_SPEC[model.config.model_type]
    num_heads, num_kv = num_heads_of(model.config, spec)
    reference = copy.deepcopy(model)
    head_dim = model.config.hidden_size // num_heads
    for module in _attentions(reference):
        for name, ids in _kv_locations(module, spec, num_heads, num_kv, head_dim).values():
            linear, conv1d = getattr(module, name), spec.attention.layout == "conv1d_concat"
            for tensor, heads in zip((linear.weight, linear.bias), _rows(linear, ids, conv1d)):
                if heads is None:
                    continue
                pooled = naive_gqa_heads(heads, num_heads, num_groups)
                # original KV head j is read by query heads j*H/KV..., all inside new group (j*H/KV) // (H/G)
                new = torch.stack([pooled[j * (num_heads // num_kv) // (num_heads // num_groups)]
                                   for j in range(num_kv)])
                with torch.no_grad():
                    if conv1d and tensor.dim() == 2:
                        tensor[:, ids] = new.permute(2, 0, 1)
                    else:
                        tensor[ids] = new
    return reference


def test_every_non_native_family_has_a_patched_attention_and_a_tiny_model():
    assert NON_NATIVE, "the architecture table lists no non-native family"
    assert set(NON_NATIVE) <= set(patched.PATCHED_FAMILIES)
    assert set(NON_NATIVE) <= set(TINY_CONFIG_KWARGS)


@pytest.mark.parametrize("model_type,overrides,attn", CASES_BY_ATTN)
def test_as_many_kv_heads_as_query_heads_is_identity(model_type, overrides, attn):
    model = tiny_model(model_type, attn_implementation=attn, **overrides)
    converted = convert_to_gqa(model, HEADS)
    originals, replaced = _attentions(model), _attentions(converted)
    assert all(type(m).__name__ == patched.PATCHED_FAMILIES[model_type].patched_class for m in replaced)
    assert all(isinstance(m, type(o)) for m, o in zip(replaced, originals))  # output recorders match on isinstance
    o_name = MODEL_TYPE_TO_ARCH_SPEC[model_type].attention.o
    assert type(getattr(replaced[0], o_name)) is type(getattr(originals[0], o_name))

    ids, mask = _inputs()
    kwargs = dict(output_attentions=True) if attn == "eager" else {}
    expected, actual = _logits(model, ids, mask, **kwargs), _logits(converted, ids, mask, **kwargs)
    torch.testing.assert_close(actual.logits, expected.logits, atol=TOLERANCE["identity"], rtol=0)
    if attn == "eager":
        assert len(actual.attentions) == len(expected.attentions) == model.config.num_hidden_layers
        for got, want in zip(actual.attentions, expected.attentions):
            torch.testing.assert_close(got, want, atol=TOLERANCE["identity"], rtol=0)
    with torch.no_grad():
        greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(converted.generate(ids[:1], **greedy), model.generate(ids[:1], **greedy))


@pytest.mark.parametrize("num_groups", [1, 2])
@pytest.mark.parametrize("model_type,overrides", CASES)
def test_fewer_kv_heads_match_the_naive_mean_reference(model_type, overrides, num_groups):
    model = tiny_model(model_type, attn_implementation="eager", **overrides)
    spec = MODEL_TYPE_TO_ARCH_SPEC[model_type]
    num_heads, num_kv = num_heads_of(model.config, spec)
    converted = convert_to_gqa(model, num_groups)
    assert converted.config.hf_llmopt_gqa["num_key_value_heads"] == num_groups

    # the converted projections are the naive means of the original K/V rows
    original, new = _attentions(model)[0], _attentions(converted)[0]
    head_dim = model.config.hidden_size // num_heads
    for proj, (name, ids) in zip(("k_proj", "v_proj"), _kv_locations(original, spec, num_heads, num_kv,
                                                                       head_dim).values()):
        weight, bias = _rows(getattr(original, name), ids, spec.attention.layout == "conv1d_concat")
        target = getattr(new, proj)
        assert target.weight.shape == (num_groups * head_dim, model.config.hidden_size)
        torch.testing.assert_close(target.weight, naive_gqa_heads(weight, num_heads, num_groups).flatten(0, 1))
        if bias is not None:
            torch.testing.assert_close(target.bias, naive_gqa_heads(bias, num_heads, num_groups).flatten())

    # ... and the patched attention computes what the family's own attention computes with those means repeated
    ids, mask = _inputs()
    reference = _reference_model(model, num_groups)
    torch.testing.assert_close(_logits(converted, ids, mask).logits, _logits(reference, ids, mask).logits,
                               atol=TOLERANCE["reference"], rtol=0)
    if _supports_sdpa(model_type, overrides):  # SDPA's own GQA handling must group the heads the same way
        converted.config._attn_implementation = reference.config._attn_implementation = "sdpa"
        torch.testing.assert_close(_logits(converted, ids, mask).logits, _logits(reference, ids, mask).logits,
                                   atol=TOLERANCE["reference"], rtol=0)


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_greedy_generate_with_cache_equals_without_cache(model_type, overrides):
    converted = convert_to_gqa(tiny_model(model_type, **overrides), 2)
    ids, mask = _inputs(seed=1)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = converted.generate(ids, attention_mask=mask, **greedy)
        uncached = converted.generate(ids, attention_mask=mask, use_cache=False, **greedy)
    assert cached.shape == (2, ids.shape[1] + 5)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_kv_cache_holds_g_heads(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    ids, _ = _inputs()
    layers, (batch, length) = model.config.num_hidden_layers, ids.shape
    one_head = 2 * layers * batch * length * (model.config.hidden_size // HEADS) * 4  # K and V, fp32
    bytes_of = {g: kv_cache_bytes(_logits(convert_to_gqa(model, g), ids, use_cache=True).cache) for g in (1, 2, 4)}
    assert bytes_of == {g: g * one_head for g in (1, 2, 4)}
    for g in (1, 2):  # exactly G/H of a cache of H heads
        assert bytes_of[g] * HEADS == bytes_of[HEADS] * g
    # the source caches H heads (falcon's new architecture expands before caching), or one when multi-query
    cached_heads = 1 if overrides.get("multi_query") and not overrides.get("new_decoder_architecture") else HEADS
    assert kv_cache_bytes(_logits(model, ids, use_cache=True).cache) == cached_heads * one_head


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_converted_model_converts_again_and_trains(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    direct, twice = convert_to_gqa(model, 2), convert_to_gqa(convert_to_gqa(model, HEADS), 2)
    ids, mask = _inputs()
    torch.testing.assert_close(_logits(twice, ids, mask).logits, _logits(direct, ids, mask).logits,
                               atol=TOLERANCE["identity"], rtol=0)
    direct.train()
    direct(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for module in _attentions(direct):
        for proj in (module.q_proj, module.k_proj, module.v_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Convert every case to G=2, save it, and reload all of them in ONE fresh process (plain from_pretrained)."""
    root = tmp_path_factory.mktemp("patched")
    ids, mask = _inputs(seed=2)
    expected = {}
    for param in CASES:
        converted = convert_to_gqa(tiny_model(*param.values[:1], **param.values[1]), 2)
        converted.save_pretrained(root / param.id)
        expected[param.id] = _logits(converted, ids, mask).logits
    torch.save({"ids": ids, "mask": mask, "names": list(expected)}, root / "inputs.pt")
    # gpt2's modeling module is imported before hf_llmopt (patched at install), the others after (import hook)
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        import transformers.models.gpt2.modeling_gpt2
        import hf_llmopt
        from transformers import AutoModelForCausalLM
        inputs = torch.load({str(root / "inputs.pt")!r})
        out = {{}}
        for name in inputs["names"]:
            model, info = AutoModelForCausalLM.from_pretrained({str(root)!r} + "/" + name, output_loading_info=True)
            with torch.no_grad():
                logits = model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
            classes = sorted({{type(m).__name__ for m in model.modules() if getattr(m, "hf_llmopt_patched", False)}})
            out[name] = dict(logits=logits, missing=info["missing_keys"], unexpected=info["unexpected_keys"],
                             classes=classes)
        torch.save(out, {str(root / "reloaded.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    return expected, torch.load(root / "reloaded.pt")


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_save_and_reload_in_a_fresh_process(reloaded, request, model_type, overrides):
    expected, got = reloaded
    name = request.node.callspec.id
    assert not got[name]["missing"] and not got[name]["unexpected"]
    assert got[name]["classes"] == [patched.PATCHED_FAMILIES[model_type].patched_class]
    torch.testing.assert_close(got[name]["logits"], expected[name], atol=TOLERANCE["reload"], rtol=0)


@pytest.mark.parametrize("model_type", NON_NATIVE)
def test_models_without_the_record_are_untouched(model_type):
    patched.install_patches()  # idempotent
    family = patched.PATCHED_FAMILIES[model_type]
    ids, mask = _inputs()
    with_patches = tiny_model(model_type)
    try:
        patched.uninstall_patches()
        without = tiny_model(model_type)
    finally:
        patched.install_patches()
    assert all(type(m).__name__ in family.attention_classes for m in _attentions(with_patches))
    assert [type(m) for m in with_patches.modules()] == [type(m) for m in without.modules()]
    state, other = with_patches.state_dict(), without.state_dict()
    assert list(state) == list(other) and all(torch.equal(state[k], other[k]) for k in state)
    assert torch.equal(_logits(with_patches, ids, mask).logits, _logits(without, ids, mask).logits)
