"""Data-aware merging of key/value heads: closed-form fits from calibration statistics.

Mean pooling (the GQA paper's initialisation) averages the K and V projections of a group, which destroys a
trained model when several heads share one: SmolLM2-135M at 3 -> 1 KV heads goes from chat perplexity 9 to
~10,000. The fits use two freedoms every attention block already has:

* **Values.** Query head ``h`` reads ``o_h @ (A_h V x)``: the output projection slice ``o_h`` can absorb any
  ``d x d`` map, so the shared value projection only has to span what the heads' value outputs need. It is the
  reduced-rank fit of all heads' values as their output slices see them, under the second moment of each head's
  attention-mixed inputs; then every head's output slice is refit by weighted least squares.
* **Keys.** A per-query-head map on the shared key must commute with RoPE, so on each rotary frequency pair it is
  a rotation-scaling, i.e. a complex scalar. Per pair, the shared key is the complex rank-1 fit of the group's
  keys (each head weighted by its query energy on that pair), and each head's scalar is folded into its query
  rows. Dimensions RoPE does not turn (partial rotary, ``rope="none"``, and pairs whose rotation over the whole
  context stays under half a radian) take any linear map, folded the same way (a reduced-rank fit with the query
  covariance as left metric). Key errors that are the same at every position are discounted where the softmax
  cannot see them.

Dimension legend (as :mod:`hf_llmopt.gqa.pooling`)::

    H  query heads   KV  KV heads before   G  KV heads after   d  head_dim   P  input features (+1 with a bias)
    n  query heads in one group   U  value features the statistics are kept in (KV * d, +1)

The math is in :mod:`hf_llmopt.gqa.fits`, the statistics collection in :mod:`hf_llmopt.gqa.statistics`.
Importing this module registers ``"data_aware"`` and ``"data_aware_values"`` with
:func:`hf_llmopt.gqa.convert.register_gqa_method`.
"""

from __future__ import annotations

import logging
import time

import torch

from ..data import sampling_pad_token_id
from .fits import (
    align_gauge,
    apply_pair_scales,
    complex_rank1_fit,
    group_query_heads,
    joint_static_key_fit,
    kv_head_similarity,
    least_squares_maps,
    mean_retention,
    reduced_rank_fit,
    rotary_pairs,
    static_pairs,
    to_complex_pairs,
)
from .layout import AttentionWeights, augmented_rows

logger = logging.getLogger(__name__)

# L-BFGS iterations polishing the value fit where heads see different attention-mixed inputs (each is ~10 ms on
# SmolLM2; 30 take the per-layer value error from ~8% to ~5%).
VALUE_REFINE_STEPS = 30


def fit_group_values(w: AttentionWeights, value_moments: torch.Tensor, group: list[int], source_kv: list[int],
                     refine_steps: int = 0):
    """Shared value projection of one group and the refit output-projection slices of its query heads.

    Works in the span of the original value rows (``U = KV * d`` features, plus a constant when the family has a
    value bias), where the statistics live and where the optimum lies for a common covariance.

    Returns:
        ``(v_weight (d, D), v_bias (d,) or None, [o slice (D_out, d) per head of the group])``.
    """
    kv, d, _ = w.v_weight.shape
    keep = kv * d + (1 if w.v_bias is not None else 0)  # the constant feature only where a bias can hold it
    covs = [value_moments[h, :keep, :keep] for h in group]
    eye = torch.eye(keep, dtype=covs[0].dtype)
    targets = [eye[source_kv[h] * d:(source_kv[h] + 1) * d] for h in group]  # head h reads its own KV head
    lefts = [w.o_weight[:, h].T.double() @ w.o_weight[:, h].double() for h in group]  # what o_h can see
    shared, _ = reduced_rank_fit(targets, covs, d, lefts, refine_steps)
    shared = align_gauge(shared, sum(targets) / len(targets), sum(covs) / len(covs))
    maps = least_squares_maps(targets, covs, shared)
    from .statistics import value_stack

    rows = shared @ value_stack(w.to(torch.float64))[:keep]  # (d, D + 1)
    o_slices = [w.o_weight[:, h].double() @ m for h, m in zip(group, maps)]
    return rows[:, :-1], (rows[:, -1] if w.v_bias is not None else None), o_slices


def fit_group_keys(w: AttentionWeights, input_moment: torch.Tensor, group: list[int], source_kv: list[int],
                   pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], query_moment: torch.Tensor | None = None,
                   retention: torch.Tensor | None = None, static_moments=None):
    """Shared key projection of one group and the query rows of its heads with their key maps folded in.

    Key errors are weighed by the input second moment over key positions, less the part of the mean that the
    softmax ignores (:func:`mean_retention`: all of it on non-rotary dimensions). Per rotary pair the shared key is
    a complex combination of the group's original keys (where the optimum lies), found by :func:`complex_rank1_fit`
    on their ``E[k k^H]``.

    Args:
        w: canonical weights of the original block.
        input_moment: ``(P, P)`` second moment of ``[x; 1]`` over key positions.
        group, source_kv: the group's original query heads and every query head's original KV head.
        pairs: ``(first, second, passthrough)``; ``passthrough`` may be a list of blocks of dimensions, each fitted
            with its own per-head linear maps (the non-rotary dimensions; the pairs RoPE barely turns).
        query_moment: second moment over query positions, for the query energies (default ``input_moment``).
        retention: ``(len(first),)`` weight of the squared mean key per rotary pair (default 1).
        static_moments: ``(dims, moments)``: :attr:`LayerStatistics.static_key_moments` and the dimensions they are
            on; the block of exactly those dimensions is fitted on them (:func:`joint_static_key_fit`).

    Returns:
        ``(k_weight (d, D), k_bias (d,) or None, [q rows (d, D + 1) per head of the group])``.
    """
    first, second, passthrough = pairs
    query_moment = input_moment if query_moment is None else query_moment
    queries = [augmented_rows(w.q_weight[h], None if w.q_bias is None else w.q_bias[h]).double() for h in group]
    keys = augmented_rows(w.k_weight, w.k_bias).double()  # (KV, d, P)
    moment, mean = input_moment, input_moment[:, -1]  # the last coordinate of [x; 1] is 1: its row is E[x]
    if w.k_bias is None:  # no bias parameter to hold a constant: fit in the space of x alone
        keys, moment, mean = keys[..., :-1], moment[:-1, :-1], mean[:-1]
    centered = moment - torch.outer(mean, mean)
    shared = keys.new_zeros(keys.shape[1:])
    if len(first):
        kv_heads = sorted({source_kv[h] for h in group})
        k_pairs = to_complex_pairs(keys[kv_heads], first, second).transpose(0, 1)  # (pairs, m, P)
        mean_keys = k_pairs @ mean.to(k_pairs.dtype)  # (pairs, m)
        kept = torch.ones(len(first), dtype=torch.float64) if retention is None else retention.double()
        kv_cov = (k_pairs @ centered.to(k_pairs.dtype) @ k_pairs.mH
                  + kept[:, None, None] * mean_keys[:, :, None] * mean_keys.conj()[:, None, :])  # E[k k^H]
        select = torch.eye(len(kv_heads), dtype=k_pairs.dtype)[[kv_heads.index(source_kv[h]) for h in group]]
        energy = torch.stack([((q[first] @ query_moment) * q[first]).sum(-1)
                              + ((q[second] @ query_moment) * q[second]).sum(-1) for q in queries], dim=1)
        coef, scales = complex_rank1_fit(select.expand(len(first), *select.shape), energy, kv_cov)
        pair_keys = (coef[:, None, :] @ k_pairs)[:, 0]  # (pairs, P)
        shared[first], shared[second] = pair_keys.real, pair_keys.imag
        # k_h ~ c_h k  =>  Re(conj(q) c_h k) = Re(conj(conj(c_h) q) k): head h's query takes conj(c_h).
        queries = [apply_pair_scales(q, scales[:, i].conj(), first, second) for i, q in enumerate(queries)]
    blocks = [passthrough] if isinstance(passthrough, torch.Tensor) else passthrough
    for dims in (b for b in blocks if len(b)):  # each block of dimensions takes any per-head linear map
        if static_moments is not None and torch.equal(dims, static_moments[0]):
            _fit_static_block(keys, dims, static_moments[1], centered, group, source_kv, shared, queries)
            continue
        targets = [keys[source_kv[h]][dims] for h in group]
        lefts = [q[dims] @ query_moment @ q[dims].T for q in queries]  # query covariance
        fit, _ = reduced_rank_fit(targets, centered, len(dims), lefts)
        fit = align_gauge(fit, sum(targets) / len(targets), centered)
        maps = least_squares_maps(targets, [centered] * len(targets), fit)
        shared[dims] = fit
        for q, m in zip(queries, maps):
            q[dims] = m.T @ q[dims]  # q^T (M k) = (M^T q)^T k
    if w.k_bias is None:
        return shared, None, queries
    return shared[:, :-1], shared[:, -1], queries


def _fit_static_block(keys, dims, moments, centered, group, source_kv, shared, queries) -> None:
    """The block of static key dimensions from joint query-key moments (:func:`joint_static_key_fit`), in place.

    The shared key lies in the span of the group's original keys on ``dims``; each head's map is folded into its
    query rows.
    """
    m = len(dims)
    kv_heads = sorted({source_kv[h] for h in group})
    span = torch.cat([torch.arange(kv * m, (kv + 1) * m) for kv in kv_heads])  # rows of the moments for the group
    stacked = torch.cat([keys[kv][dims] for kv in kv_heads])  # (r, P)
    selectors = torch.eye(len(span), dtype=stacked.dtype).reshape(len(kv_heads), m, len(span))
    targets = [selectors[kv_heads.index(source_kv[h])] for h in group]
    from .statistics import unpack_static_key_moments

    fit, maps, _ = joint_static_key_fit(
        [unpack_static_key_moments(moments[h], m)[:, :, span][:, :, :, span] for h in group], targets)
    span_cov = stacked @ centered.to(stacked.dtype) @ stacked.T
    aligned = align_gauge(fit, sum(targets) / len(targets), span_cov)
    if aligned is not fit:  # W -> R W, so every B_h -> B_h R^+
        maps = [b @ fit @ span_cov @ aligned.T @ torch.linalg.pinv(aligned @ span_cov @ aligned.T, hermitian=True)
                for b in maps]
    shared[dims] = aligned @ stacked
    for q, b in zip(queries, maps):
        q[dims] = b.T @ q[dims]


def _permute_query_heads(w: AttentionWeights, order: list[int]) -> AttentionWeights:
    """Reorder the query heads of an MHA-expanded block (queries, output columns and their private KV copies)."""
    idx = torch.tensor(order)
    pick = lambda t: None if t is None else t[idx]  # noqa: E731
    heads = w.num_heads
    return w.replace(
        q_weight=w.q_weight[idx], q_bias=pick(w.q_bias), o_weight=w.o_weight[:, idx],
        k_weight=w.k_weight[idx], k_bias=pick(w.k_bias), v_weight=w.v_weight[idx], v_bias=pick(w.v_bias),
        k_norm={k: (v[idx] if v.dim() and v.shape[0] == heads else v) for k, v in w.k_norm.items()},
    )


def merge_attention_heads(w: AttentionWeights, stats, spec, groups: list[list[int]], pairs, fit_keys: bool = True,
                          refine_steps: int = 0, retention: torch.Tensor | None = None) -> AttentionWeights:
    """Merge one attention block to ``len(groups)`` KV heads with the data-aware fits.

    Query heads are reordered so that group ``g`` is the contiguous block of heads ``g * n .. (g + 1) * n - 1``
    (transformers' ``repeat_kv`` convention). Whatever is not refit (the keys when ``fit_keys=False``, any key
    norm) is mean-pooled over the group, as the paper does.

    Args:
        w: canonical fp32 weights of the original block.
        stats: its :class:`~hf_llmopt.gqa.statistics.LayerStatistics`.
        spec: the family's :class:`~hf_llmopt.architectures.ArchSpec`.
        groups: original query-head indices of each new KV head.
        pairs: :func:`rotary_pairs` of the family.
        fit_keys: fit the keys too (``data_aware``) or only the values (``data_aware_values``).
        refine_steps: L-BFGS iterations of the value fit (:func:`reduced_rank_fit`).
        retention: per rotary pair, see :func:`fit_group_keys`.
    """
    from .convert import expand_to_heads, regroup
    from .pooling import contiguous_groups

    heads, kv = w.num_heads, w.num_kv_heads
    source_kv = [h // (heads // kv) for h in range(heads)]
    order = [h for g in groups for h in g]
    base = regroup(_permute_query_heads(expand_to_heads(w, spec, heads), order), spec,
                   contiguous_groups(heads, len(groups)))
    new = {name: (None if t is None else t.double().clone()) for name, t in (
        ("q_weight", base.q_weight), ("q_bias", base.q_bias), ("k_weight", base.k_weight), ("k_bias", base.k_bias),
        ("v_weight", base.v_weight), ("v_bias", base.v_bias), ("o_weight", base.o_weight))}
    for g, group in enumerate(groups):
        slots = range(g * len(group), (g + 1) * len(group))  # where the group's heads sit in the new order
        v_weight, v_bias, o_slices = fit_group_values(w, stats.value_moments, group, source_kv, refine_steps)
        new["v_weight"][g] = v_weight
        if v_bias is not None:
            new["v_bias"][g] = v_bias
        for slot, o_slice in zip(slots, o_slices):
            new["o_weight"][:, slot] = o_slice
        if fit_keys:
            static = (None if stats.static_key_moments is None else (stats.static_dims, stats.static_key_moments))
            k_weight, k_bias, queries = fit_group_keys(w, stats.input_moment, group, source_kv, pairs,
                                                        stats.query_moment, retention, static)
            new["k_weight"][g] = k_weight
            if k_bias is not None:
                new["k_bias"][g] = k_bias
            for slot, q in zip(slots, queries):
                new["q_weight"][slot] = q[:, :-1]
                if new["q_bias"] is not None:
                    new["q_bias"][slot] = q[:, -1]
    return base.replace(**{k: (None if v is None else v.to(w.q_weight.dtype)) for k, v in new.items()})


def _choose_groups(w: AttentionWeights, stats, num_groups: int, pairs, by_similarity: bool) -> list[list[int]]:
    from .pooling import contiguous_groups

    heads = w.num_heads
    if num_groups == 1 or not by_similarity:
        return contiguous_groups(heads, num_groups)
    first, second, blocks = pairs
    linear = torch.cat(list(blocks)) if not isinstance(blocks, torch.Tensor) else blocks
    kv_sim = kv_head_similarity(augmented_rows(w.k_weight, w.k_bias).double(),
                                augmented_rows(w.v_weight, w.v_bias).double(),
                                stats.input_moment, first, second, linear)
    source_kv = torch.tensor([h // (heads // w.num_kv_heads) for h in range(heads)])
    return group_query_heads(kv_sim[source_kv][:, source_kv], num_groups)


def _data_aware(model, spec, weights, num_key_value_heads, cfg, calibration_data, tokenizer, fit_keys=True):
    from .convert import mean_pool_attention
    from .statistics import (MAX_STATIC_KEY_MOMENT_ENTRIES, AttentionProbabilitiesUnavailable, calibration_blocks,
                             collect_attention_statistics, context_length, has_qk_norm, rotary_dim, rotary_inv_freq,
                             static_key_moment_entries)

    extra: dict = {}
    qk_norm = has_qk_norm(model, spec)
    if fit_keys and qk_norm:
        reason = (f"{model.config.model_type} normalises queries/keys after projection ({spec.attention.q_norm}/"
                  f"{spec.attention.kv_norm}), so the per-head key maps cannot be folded into the query projection")
        if cfg.method != "auto":
            raise ValueError(f"method='data_aware' cannot fit the keys: {reason}. Use method='data_aware_values' "
                             "(value fit, mean-pooled keys) or method='auto', which falls back to it.")
        logger.warning("GQA method 'auto': %s; falling back to 'data_aware_values'.", reason)
        fit_keys = False
        extra["fallback_reason"] = reason
    start = time.perf_counter()
    head_dim = weights[0].head_dim
    blocks = calibration_blocks(model, calibration_data, tokenizer, cfg, head_dim)
    pad = sampling_pad_token_id(tokenizer)
    rot = rotary_dim(model.config, head_dim, spec.attention.rope)
    first, second, passthrough = rotary_pairs(head_dim, rot, spec.attention.rope)
    inv_freq = rotary_inv_freq(model, rot) if len(first) else torch.zeros(0, dtype=torch.float64)
    context = context_length(model.config)
    static = static_pairs(inv_freq, context, cfg.static_rope_angle)
    static_dims = torch.cat([first[static], second[static]])
    entries = static_key_moment_entries(weights[0].num_heads, weights[0].num_kv_heads, len(static_dims))
    joint = fit_keys and cfg.static_key_fit == "joint" and 0 < entries <= MAX_STATIC_KEY_MOMENT_ENTRIES
    try:
        stats = collect_attention_statistics(model, spec, weights, blocks, pad_token_id=pad,
                                             static_dims=static_dims if joint else None)
    except AttentionProbabilitiesUnavailable as err:
        if cfg.method != "auto":
            raise
        logger.warning("GQA method 'auto': %s; falling back to mean pooling.", err)
        return [mean_pool_attention(w, spec, num_key_value_heads) for w in weights], {
            "method": "mean", "fallback_reason": str(err)}
    collected = time.perf_counter()
    pairs = (first[~static], second[~static], [static_dims, passthrough])
    retention = mean_retention(inv_freq[~static], context or 2048)
    # Reordering query heads needs per-head query norms to move with them; those families keep contiguous groups.
    by_similarity = cfg.group_by_similarity and not (qk_norm and spec.attention.kv_norm_layout != "shared")
    new_weights, layer_groups = [], []
    for w, s in zip(weights, stats):
        groups = _choose_groups(w, s, num_key_value_heads, pairs, by_similarity)
        layer_groups.append(groups)
        new_weights.append(merge_attention_heads(w, s, spec, groups, pairs, fit_keys, VALUE_REFINE_STEPS,
                                                 retention))
    same = all(g == layer_groups[0] for g in layer_groups)
    extra.update({
        "method": "data_aware" if fit_keys else "data_aware_values",
        "groups": layer_groups[0] if same else layer_groups,
        "groups_per_layer": not same,
        "calibration_data": "self-sampled" if calibration_data is None else type(calibration_data).__name__,
        "calibration_tokens": stats[0].tokens,
        "rotary_dim": rot,
        "static_rope_angle": cfg.static_rope_angle,
        "static_rope_pairs": int(static.sum()),
        "static_key_fit": ("joint_query_key_moments" if joint else
                           "separate_query_key_moments" if fit_keys and len(static_dims) else None),
        "key_fit": ("complex_rank1_per_rope_pair" if fit_keys else "mean"),
        "value_fit": "reduced_rank",
        "statistics_seconds": round(collected - start, 2),
        "fit_seconds": round(time.perf_counter() - collected, 2),
    })
    return new_weights, extra


def data_aware_method(model, spec, weights, num_key_value_heads, cfg, calibration_data, tokenizer):
    """``method="data_aware"``: fit keys (per RoPE pair) and values, fold the per-head maps into q and o."""
    return _data_aware(model, spec, weights, num_key_value_heads, cfg, calibration_data, tokenizer, fit_keys=True)


def data_aware_values_method(model, spec, weights, num_key_value_heads, cfg, calibration_data, tokenizer):
    """``method="data_aware_values"``: fit the values only; keys are mean-pooled (any key norm too)."""
    return _data_aware(model, spec, weights, num_key_value_heads, cfg, calibration_data, tokenizer, fit_keys=False)


def _register():
    from .convert import DATA_AWARE_METHODS, register_gqa_method

    for name, fn in (("data_aware", data_aware_method), ("data_aware_values", data_aware_values_method)):
        if name not in DATA_AWARE_METHODS:
            register_gqa_method(name, fn)


_register()
