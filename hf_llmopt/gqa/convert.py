"""Module surgery: convert a causal LM's attention to ``G`` key/value heads.

The converted model is a fresh instance built from a copied config (so every attention module's bookkeeping,
``num_key_value_groups`` and friends, is computed by transformers itself), with all non-attention weights copied
and the attention projections written from the transformed canonical weights (:mod:`hf_llmopt.gqa.layout`).
The source model is never modified.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from .. import __version__
from .._compat import is_causal_lm, library_versions
from ..architectures import ArchSpec, get_arch_spec
from .config import GQAConfig
from .layout import AttentionWeights, kv_norm_per_head, read_attention, write_attention
from .pooling import contiguous_groups, merge_kv_heads, repeat_kv_heads, valid_num_kv_heads
from .statistics import calibration_blocks, shared_calibration_blocks

logger = logging.getLogger(__name__)

CONFIG_RECORD_KEY = "hf_llmopt_gqa"


def get_decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.layers)


def get_attention(layer: nn.Module, spec: ArchSpec) -> nn.Module:
    return layer.get_submodule(spec.attention.module)


def num_heads_of(config, spec: ArchSpec) -> tuple[int, int]:
    """(H, KV) of a config, whatever the family calls them."""
    heads = getattr(config, spec.heads_attr, None) or config.num_attention_heads
    record = getattr(config, CONFIG_RECORD_KEY, None)
    if record:  # patched families keep their original config fields; the record holds the converted count
        return heads, int(record["num_key_value_heads"])
    if spec.attention.native:
        kv = getattr(config, spec.attention.kv_heads_attr, None)
        return heads, int(kv if kv is not None else heads)
    if spec.attention.layout == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return heads, int(config.num_kv_heads)
        return heads, 1 if getattr(config, "multi_query", False) else heads
    if spec.attention.layout == "bigcode":
        return heads, 1 if getattr(config, "multi_query", True) else heads
    return heads, heads


@torch.no_grad()
def rewrite_attention(model: nn.Module, spec: ArchSpec, fn: Callable[[AttentionWeights], AttentionWeights]) -> None:
    """Replace every attention block's canonical weights ``w`` by ``fn(w)``, in place (native or patched)."""
    heads, kv = num_heads_of(model.config, spec)
    for layer in get_decoder_layers(model, spec):
        attention = get_attention(layer, spec)
        w = read_attention(attention, spec.attention, heads, kv)
        write_attention(attention, spec.attention, fn(w), patched=getattr(attention, "hf_llmopt_patched", False))


def check_num_kv_heads(num_heads: int, num_key_value_heads: int) -> None:
    if isinstance(num_key_value_heads, bool) or not isinstance(num_key_value_heads, int):
        raise TypeError(f"num_key_value_heads must be an int, got {num_key_value_heads!r}")
    valid = valid_num_kv_heads(num_heads)
    if num_key_value_heads < 1:
        raise ValueError(f"num_key_value_heads must be >= 1, got {num_key_value_heads}; valid values: {valid}")
    if num_heads % num_key_value_heads:
        raise ValueError(
            f"num_key_value_heads={num_key_value_heads} does not divide the {num_heads} query heads; "
            f"valid values for this model: {valid}"
        )


def regroup(w: AttentionWeights, spec: ArchSpec, groups: list[list[int]]) -> AttentionWeights:
    """Mean-merge KV heads of an MHA-expanded block into ``groups`` (query order unchanged)."""
    k_norm = kv_norm_per_head(spec.attention, w.k_norm, w.num_kv_heads, w.head_dim)
    per_head_norm = spec.attention.kv_norm_layout in ("flat", "per_head", "module_list")
    merge = lambda t: None if t is None else merge_kv_heads(t, groups)  # noqa: E731
    return w.replace(
        k_weight=merge(w.k_weight), k_bias=merge(w.k_bias), v_weight=merge(w.v_weight), v_bias=merge(w.v_bias),
        k_norm={k: merge(v) for k, v in k_norm.items()} if per_head_norm else w.k_norm,
    )


def expand_to_heads(w: AttentionWeights, spec: ArchSpec, target: int) -> AttentionWeights:
    """Repeat KV heads so that there are ``target`` of them; query head h keeps reading the same key/value."""
    repeats = target // w.num_kv_heads
    if repeats == 1:
        return w
    k_norm = kv_norm_per_head(spec.attention, w.k_norm, w.num_kv_heads, w.head_dim)
    per_head_norm = spec.attention.kv_norm_layout in ("flat", "per_head", "module_list")
    rep = lambda t: None if t is None else repeat_kv_heads(t, repeats)  # noqa: E731
    return w.replace(
        k_weight=rep(w.k_weight), k_bias=rep(w.k_bias), v_weight=rep(w.v_weight), v_bias=rep(w.v_bias),
        k_norm={k: rep(v) for k, v in k_norm.items()} if per_head_norm else w.k_norm,
    )


def mean_pool_attention(w: AttentionWeights, spec: ArchSpec, num_key_value_heads: int) -> AttentionWeights:
    """The paper's conversion: new KV head ``j`` is the mean of the KV heads its query heads used.

    Works for any ``G`` that divides ``H``: the block is first expanded to one KV head per query head (lossless),
    then contiguous query groups are mean-pooled. When ``G`` divides the old ``KV`` this equals pooling the old
    heads directly; when ``G`` is a multiple of ``KV`` it is a lossless repeat.
    """
    mha = expand_to_heads(w, spec, w.num_heads)
    return regroup(mha, spec, contiguous_groups(w.num_heads, num_key_value_heads))


# method name -> fn(model, spec, weights, num_key_value_heads, gqa_config, calibration_data, tokenizer)
#                 -> (list[AttentionWeights], extra record dict)
DATA_AWARE_METHODS: dict[str, Callable[..., tuple[list[AttentionWeights], dict]]] = {}
AUTO_METHOD = "data_aware"


def register_gqa_method(name: str, fn: Callable, overwrite: bool = False) -> None:
    if name in DATA_AWARE_METHODS and not overwrite:
        raise ValueError(f"GQA method {name!r} is already registered; pass overwrite=True to replace it")
    DATA_AWARE_METHODS[name] = fn


def _source_name(model) -> str | None:
    return getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def build_converted_model(model: nn.Module, spec: ArchSpec, new_weights: list[AttentionWeights], record: dict):
    """Instantiate the target architecture with ``G`` KV heads and fill it from ``model`` and ``new_weights``."""
    from transformers.initialization import no_init_weights

    num_kv = record["num_key_value_heads"]
    config = copy.deepcopy(model.config)
    if spec.attention.native:
        setattr(config, spec.attention.kv_heads_attr, num_kv)
    setattr(config, CONFIG_RECORD_KEY, record)
    if not spec.attention.native:
        from .patched import ensure_installed

        ensure_installed(config.model_type)
    with no_init_weights():
        new = type(model)(config)
    new.to(dtype=next(model.parameters()).dtype)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)

    layers_prefix = spec.layers + "."
    attn_prefixes = tuple(f"{layers_prefix}{i}.{spec.attention.module}." for i in range(len(new_weights)))
    # Copy everything whose name and shape survive (embeddings, MLPs, norms, and attention parameters that do not
    # depend on the number of KV heads, such as a shared k_norm); the rest is written from `new_weights` below.
    target_state = new.state_dict()
    state = model.state_dict()
    kept = {k: v for k, v in state.items() if k in target_state and target_state[k].shape == v.shape}
    missing, _ = new.load_state_dict(kept, strict=False)
    written = _written_names(spec, patched=not spec.attention.native)
    leftover = [k for k in missing if k not in _tied_keys(new) and _attention_child(k, attn_prefixes) not in written]
    if leftover:
        raise RuntimeError(f"conversion left weights uninitialised: {leftover[:5]}")
    dropped = sorted(k for k in set(state) - set(kept) if not k.startswith(attn_prefixes))
    if dropped:
        raise RuntimeError(f"conversion would drop weights: {dropped[:5]}")

    for i, layer in enumerate(get_decoder_layers(new, spec)):
        write_attention(get_attention(layer, spec), spec.attention, new_weights[i], patched=not spec.attention.native)
    new.tie_weights()
    new.train(model.training)
    return new


def _attention_child(key: str, attn_prefixes: tuple[str, ...]) -> str | None:
    """``k_proj`` for ``model.layers.3.self_attn.k_proj.weight``; ``None`` outside attention blocks."""
    for prefix in attn_prefixes:
        if key.startswith(prefix):
            return key[len(prefix):].split(".")[0]
    return None


def _written_names(spec: ArchSpec, patched: bool) -> set[str]:
    """Attention submodules that :func:`write_attention` fills."""
    a = spec.attention
    names = {"q_proj", "k_proj", "v_proj", a.o} if patched else set(a.projection_names)
    return names | ({a.kv_norm} if a.kv_norm else set())


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def _logit_scale_target(original, spec: ArchSpec, cfg, calibration_data, tokenizer):
    """The reference the ``logit_scale="auto"`` searches share: the original's distributions on calibration text."""
    from .calibrate import _head_dim
    from .sharpen import ReferenceKL

    return ReferenceKL(original, calibration_blocks(original, calibration_data, tokenizer, cfg,
                                                    _head_dim(original, spec)))


# one conversion builds its calibration blocks once: the fits, the layer-wise stage and the scale search share them
@shared_calibration_blocks()
def convert_to_gqa(
    model: nn.Module,
    num_key_value_heads: int,
    method: str = "mean",
    calibration_data: Any = None,
    tokenizer=None,
    arch_spec: ArchSpec | None = None,
    **kwargs,
):
    """Convert a causal LM's attention to ``num_key_value_heads`` KV heads (GQA; ``1`` is MQA).

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``). It is left untouched.
        num_key_value_heads: ``G``; must divide the number of query heads.
        method: ``"mean"``, ``"data_aware"``, ``"data_aware_values"`` or ``"auto"`` (see :class:`GQAConfig`).
        calibration_data: for data-aware methods: ``None`` (text sampled from the model itself), a list of strings,
            a ``datasets.Dataset`` with a ``text``/``messages``/``question`` column, a path to a json/jsonl/txt
            file, or a ``LongTensor`` of token ids.
        tokenizer: needed for text calibration data.
        arch_spec: overrides the architecture table entry.
        **kwargs: any other :class:`GQAConfig` field (``layerwise_calibration=True``, ``calibration_tokens=...``).

    Returns:
        The converted model (same class, config updated, conversion recorded in ``config.hf_llmopt_gqa``).

    Example:
        >>> from hf_llmopt import load_default_model, convert_to_gqa
        >>> model, tok = load_default_model()
        >>> mqa = convert_to_gqa(model, 1)
        >>> mqa.config.num_key_value_heads
        1
    """
    if not is_causal_lm(model):
        raise TypeError(
            f"convert_to_gqa needs a causal language model (an AutoModelForCausalLM such as LlamaForCausalLM), "
            f"got {type(model).__name__}"
        )
    cfg = GQAConfig(num_key_value_heads=num_key_value_heads, method=method, **kwargs)
    spec = get_arch_spec(model, arch_spec)
    heads, kv = num_heads_of(model.config, spec)
    check_num_kv_heads(heads, num_key_value_heads)
    method = AUTO_METHOD if cfg.method == "auto" else cfg.method
    start = time.perf_counter()

    layers = get_decoder_layers(model, spec)
    weights = [read_attention(get_attention(layer, spec), spec.attention, heads, kv).to(torch.float32)
               for layer in layers]
    extra: dict = {}
    if num_key_value_heads >= kv or method == "mean":
        # Expansion (G >= KV) is exact, so every method reduces to the mean path there.
        new_weights = [mean_pool_attention(w, spec, num_key_value_heads) for w in weights]
        method = "mean" if num_key_value_heads < kv else "repeat"
    else:
        if method not in DATA_AWARE_METHODS:
            from . import data_aware  # noqa: F401  (registers the data-aware methods)
        if method not in DATA_AWARE_METHODS:
            raise ValueError(f"GQA method {method!r} is not available; registered: {sorted(DATA_AWARE_METHODS)}")
        new_weights, extra = DATA_AWARE_METHODS[method](
            model, spec, weights, num_key_value_heads, cfg, calibration_data, tokenizer
        )
        # A closed-form fit can leave query/key and value/output pairs far out of balance (o_proj 10-50x the
        # original's RMS on SmolLM2), which makes Adam diverge in the layer-wise stage and in uptraining.
        # Rebalancing is exact: the converted model computes the same function.
        from .balance import balance_attention_weights

        scale_keys = spec.attention.kv_norm is None and spec.attention.q_norm is None
        new_weights = [balance_attention_weights(w, scale_keys) for w in new_weights]

    record = {
        "method": method,
        "requested_method": cfg.method,
        "num_key_value_heads": num_key_value_heads,
        "source_num_key_value_heads": kv,
        "num_attention_heads": heads,
        "groups": [list(range(g * (heads // num_key_value_heads), (g + 1) * (heads // num_key_value_heads)))
                   for g in range(num_key_value_heads)],
        "source_model": _source_name(model),
        "hf_llmopt_version": __version__,
        "library_versions": library_versions(),
        **extra,
    }
    new = build_converted_model(model, spec, new_weights, record)
    # Only fitted keys shrink the logits (hf_llmopt.gqa.sharpen); "auto" searches after each fit, a number is
    # applied once
    sharpen = extra.get("method") == "data_aware" and cfg.logit_scale != "off"
    target, searches = None, []
    if sharpen:
        from .sharpen import fit_logit_scale, scale_attention_logits

        if cfg.logit_scale == "auto":
            target = _logit_scale_target(model, spec, cfg, calibration_data, tokenizer)
            searches.append(fit_logit_scale(new, spec, target))
        else:
            scale_attention_logits(new, spec, float(cfg.logit_scale))
            searches.append({"logit_scale": float(cfg.logit_scale)})
    if cfg.layerwise_calibration and method not in ("repeat",):
        from .calibrate import layerwise_calibrate

        # the second search counts against the layer-wise budget: as long as the first one is reserved for it
        reserve = searches[0].get("logit_scale_seconds", 0.0) if searches else 0.0
        stats = layerwise_calibrate(model, new, spec, cfg, calibration_data, tokenizer, reserve_seconds=reserve)
        if target is not None:
            searches.append(fit_logit_scale(new, spec, target))
            stats["layerwise_seconds"] = round(stats["layerwise_seconds"] + searches[-1].get(
                "logit_scale_seconds", 0.0), 2)
        record.update(stats)
    if searches:
        record["logit_scale"] = round(math.prod(s["logit_scale"] for s in searches), 4)
        record["logit_scale_searches"] = searches
    record["conversion_seconds"] = round(time.perf_counter() - start, 2)
    setattr(new.config, CONFIG_RECORD_KEY, record)
    logger.info("Converted %s to %d KV heads with %s in %.1fs", type(model).__name__, num_key_value_heads,
                method, record["conversion_seconds"])
    return new
