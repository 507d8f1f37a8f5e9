"""Data-aware merging of key/value heads: closed-form fits from calibration statistics (pure tensor math).

Mean pooling (the GQA paper's initialisation) averages the K and V projections of a group, which destroys a
trained model when several heads share one: SmolLM2-135M at 3 -> 1 KV heads goes from perplexity 9 to ~10,000.
The fits below use two freedoms every attention block already has:

* **Values.** Query head ``h`` reads ``o_h @ (A_h V x)``: the output projection slice ``o_h`` can absorb any
  ``d x d`` map, so the shared value projection only has to span what the heads' value outputs need. It is the
  reduced-rank fit of all heads' values as their output slices see them, under the covariance of the
  attention-mixed inputs of each head; then every head's output slice is refit by weighted least squares.
* **Keys.** A per-query-head map on the shared key must commute with RoPE, so on each rotary frequency pair it is
  a rotation-scaling, i.e. a complex scalar. Per pair, the shared key is the complex rank-1 fit of the group's
  keys (each head weighted by its query energy on that pair), and each head's complex scalar is folded into its
  query rows. Dimensions without rotation (partial rotary, ``rope="none"``) take any linear map, folded the same
  way, and use the reduced-rank fit with the query covariance as left metric.

Dimension legend (as :mod:`hf_llmopt.gqa.pooling`)::

    H  query heads   KV  KV heads before   G  KV heads after   d  head_dim   P  input features (+1 with a bias)
    n  heads in one group   U  value features the statistics are kept in (KV * d, +1 with a bias)

Statistics collection lives in :mod:`hf_llmopt.gqa.statistics`. Importing this module registers the methods
``"data_aware"`` and ``"data_aware_values"`` with :func:`hf_llmopt.gqa.convert.register_gqa_method`.
"""

from __future__ import annotations

import torch

from .layout import AttentionWeights

# Eigenvalues below this fraction of the largest are treated as zero when whitening a covariance: calibration
# data never fills every direction of a 577-dim input space evenly.
RELATIVE_EIGEN_FLOOR = 1e-7


def symmetric_sqrt(cov: torch.Tensor, floor: float = RELATIVE_EIGEN_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C^{1/2}, C^{+1/2})`` of a PSD matrix: the square root and the pseudo-inverse square root.

    Directions with eigenvalue below ``floor * max`` are dropped from the inverse (the data says nothing there).
    """
    cov = 0.5 * (cov + cov.T)
    eigval, eigvec = torch.linalg.eigh(cov)
    keep = eigval > floor * eigval.max().clamp_min(torch.finfo(cov.dtype).tiny)
    root = (eigvec * eigval.clamp_min(0).sqrt()) @ eigvec.T
    inv_root = (eigvec[:, keep] * eigval[keep].rsqrt()) @ eigvec[:, keep].T
    return root, inv_root


def least_squares_maps(targets, covariances, shared: torch.Tensor) -> list[torch.Tensor]:
    """Per-target maps ``B_h = argmin_B E||(B W - T_h) z_h||^2 = T_h C_h W^T (W C_h W^T)^+``.

    Args:
        targets: ``n`` tensors ``T_h`` of shape ``(m, P)``.
        covariances: ``n`` tensors ``C_h = E[z_h z_h^T]`` of shape ``(P, P)``.
        shared: ``W`` of shape ``(r, P)``.

    Returns:
        ``n`` tensors of shape ``(m, r)``. A left metric on the ``m`` outputs does not change them.
    """
    maps = []
    for target, cov in zip(targets, covariances):
        cross = target @ cov @ shared.T  # (m, r)
        gram = shared @ cov @ shared.T  # (r, r)
        maps.append(cross @ torch.linalg.pinv(gram, hermitian=True))
    return maps


def reduced_rank_objective(targets, covariances, left_metrics, shared: torch.Tensor) -> torch.Tensor:
    """``sum_h tr(L_h (B_h W - T_h) C_h (B_h W - T_h)^T)`` with the optimal ``B_h`` (differentiable in ``W``)."""
    total = shared.new_zeros(())
    for target, cov, left in zip(targets, covariances, left_metrics):
        cross = target @ cov @ shared.T
        gram = shared @ cov @ shared.T
        gram = gram + 1e-10 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        explained = cross @ torch.linalg.solve(gram, cross.T)  # T C W^T (W C W^T)^-1 W C T^T
        total = total + torch.trace(left @ (target @ cov @ target.T - explained))
    return total


def reduced_rank_fit(targets, covariances, rank: int, left_metrics=None, refine_steps: int = 0):
    """A shared ``(rank, P)`` projection ``W`` and per-target maps ``B_h`` with ``B_h W ~ T_h``.

    Minimises ``sum_h tr(L_h (B_h W - T_h) C_h (B_h W - T_h)^T)``. With one covariance for all targets this is
    reduced-rank regression, solved exactly: ``W``'s rows are the top generalised eigenvectors of
    ``(sum_h C T_h^T L_h T_h C, C)``. With per-target covariances there is no closed form; two candidates are
    scored on the exact objective, the eigenproblem with the mean covariance ``C`` (rows in the span of the
    targets: exact when the targets share a ``rank``-dim row space) and the one with each ``C_h`` inside the sum,
    and ``refine_steps`` L-BFGS iterations (``B_h`` eliminated in closed form) polish the better one.

    Args:
        targets: ``n`` tensors ``(m_h, P)``.
        covariances: ``n`` PSD ``(P, P)`` (or one tensor to share).
        rank: rows of ``W``.
        left_metrics: ``n`` PSD ``(m_h, m_h)`` weighting the outputs (identity when ``None``).
        refine_steps: L-BFGS iterations on the heterogeneous objective (0 for the closed form only).

    Returns:
        ``(W, [B_h])``.
    """
    if isinstance(covariances, torch.Tensor) and covariances.dim() == 2:
        covariances = [covariances] * len(targets)
    if left_metrics is None:
        left_metrics = [torch.eye(t.shape[0], dtype=t.dtype) for t in targets]
    mean_cov = sum(covariances) / len(covariances)
    _, inv_root = symmetric_sqrt(mean_cov)
    outer = sum(t.T @ lm @ t for t, lm in zip(targets, left_metrics))  # (P, P)
    candidates = [_top_generalised(mean_cov @ outer @ mean_cov, inv_root, rank)]
    if len({id(c) for c in covariances}) > 1:
        pulled = sum(c @ t.T @ lm @ t @ c for t, c, lm in zip(targets, covariances, left_metrics))
        candidates.append(_top_generalised(pulled, inv_root, rank))
        scores = [float(reduced_rank_objective(targets, covariances, left_metrics, w)) for w in candidates]
        candidates = [candidates[scores.index(min(scores))]]
    shared = _refine(targets, covariances, left_metrics, candidates[0], refine_steps)
    return shared, least_squares_maps(targets, covariances, shared)


def _top_generalised(matrix: torch.Tensor, inv_root: torch.Tensor, rank: int) -> torch.Tensor:
    """``(rank, P)``: top eigenvectors of ``matrix`` relative to the covariance whose ``C^{+1/2}`` is given."""
    whitened = inv_root @ matrix @ inv_root
    _, eigvec = torch.linalg.eigh(0.5 * (whitened + whitened.T))
    return (inv_root @ eigvec[:, -rank:].flip(-1)).T  # strongest direction first


def _refine(targets, covariances, left_metrics, shared, steps: int) -> torch.Tensor:
    if steps <= 0 or len({id(c) for c in covariances}) == 1:
        return shared  # one covariance: the eigen solution is already optimal
    start = float(reduced_rank_objective(targets, covariances, left_metrics, shared))
    param = shared.contiguous().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([param], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = reduced_rank_objective(targets, covariances, left_metrics, param)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    refined = param.detach()
    end = float(reduced_rank_objective(targets, covariances, left_metrics, refined))
    return refined if end < start else shared


def rotary_pairs(head_dim: int, rotary_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which head dimensions RoPE rotates together.

    Args:
        head_dim: ``d``.
        rotary_dim: how many leading dimensions are rotated (``d`` unless the family uses partial rotary).
        layout: ``"rotate_half"`` (pairs ``(i, i + rotary_dim/2)``), ``"interleaved"`` (``(2i, 2i + 1)``) or
            ``"none"``.

    Returns:
        ``(first, second, passthrough)``: pair ``p`` is the complex coordinate ``x[first[p]] + i x[second[p]]``
        (RoPE multiplies it by ``e^{i theta_p t}``); ``passthrough`` are the dimensions RoPE leaves alone.
    """
    if layout == "none" or rotary_dim == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, torch.arange(head_dim)
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim={rotary_dim} must be even and at most head_dim={head_dim}")
    if layout == "rotate_half":
        first = torch.arange(rotary_dim // 2)
        second = first + rotary_dim // 2
    elif layout == "interleaved":
        first = torch.arange(0, rotary_dim, 2)
        second = first + 1
    else:
        raise ValueError(f"unknown RoPE layout {layout!r}")
    return first, second, torch.arange(rotary_dim, head_dim)


def to_complex_pairs(rows: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``(..., d, P)`` real projection rows -> ``(..., pairs, P)`` complex rows ``rows[first] + i rows[second]``."""
    return torch.complex(rows[..., first, :], rows[..., second, :])


def apply_pair_scales(rows: torch.Tensor, scales: torch.Tensor, first: torch.Tensor, second: torch.Tensor):
    """Multiply every rotary pair of ``rows`` (``(d, ...)``: weight rows or a bias) by a complex scalar.

    Complex multiplication commutes with RoPE's rotation ``e^{i theta t}``, which is why a per-head map of this form
    can be moved between keys and queries. Dimensions outside the pairs are returned unchanged.

    Args:
        rows: ``(d, ...)`` real.
        scales: ``(pairs,)`` complex.
    """
    out = rows.clone()
    shape = (-1,) + (1,) * (rows.dim() - 1)
    a, b = scales.real.reshape(shape).to(rows.dtype), scales.imag.reshape(shape).to(rows.dtype)
    x1, x2 = rows[first], rows[second]
    out[first] = a * x1 - b * x2
    out[second] = b * x1 + a * x2
    return out


def complex_rank1_fit(rows: torch.Tensor, weights: torch.Tensor, cov: torch.Tensor):
    """Per rotary pair, one shared complex key row and a complex scalar per head: ``rows[p, h] ~ c[p, h] k[p]``.

    Minimises ``sum_h w[p, h] E|(c[p, h] k[p] - rows[p, h]) x|^2`` for ``x`` with second moment ``cov``: the
    top singular pair of ``diag(sqrt(w)) rows C^{1/2}``; ``c`` is then refit by least squares (so heads with zero
    weight still get their best scalar) and the common complex factor is fixed so that the weighted mean of ``c``
    is 1 (identical heads give ``c = 1`` and their own row).

    Args:
        rows: ``(pairs, n, P)`` complex key rows of the ``n`` query heads of one group.
        weights: ``(pairs, n)`` non-negative, the query energy of each head on each pair.
        cov: ``(P, P)`` real second moment of the inputs.

    Returns:
        ``(shared (pairs, P) complex, scales (pairs, n) complex)``.
    """
    root, inv_root = symmetric_sqrt(cov)
    root_c, inv_root_c, cov_c = (t.to(rows.dtype) for t in (root, inv_root, cov))
    whitened = weights.sqrt().to(rows.dtype)[..., None] * (rows @ root_c)  # (pairs, n, P)
    _, _, vh = torch.linalg.svd(whitened, full_matrices=False)
    shared = vh[:, 0, :] @ inv_root_c  # (pairs, P): shared C^{1/2} = top right singular vector
    scales = _complex_scales(rows, shared, cov_c)
    mean_scale = (weights.to(rows.dtype) * scales).sum(-1) / weights.sum(-1).clamp_min(1e-30).to(rows.dtype)
    fix = torch.where(mean_scale.abs() > 1e-12, mean_scale, torch.ones_like(mean_scale))
    return shared * fix[:, None], scales / fix[:, None]


def _complex_scales(rows: torch.Tensor, shared: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Least-squares ``c[p, h] = <rows[p, h], shared[p]>_C / <shared[p], shared[p]>_C``."""
    shared_cov = shared @ cov  # (pairs, P)
    num = (rows * shared_cov.conj()[:, None, :]).sum(-1)  # rows C shared^H
    den = (shared * shared_cov.conj()).sum(-1).real.clamp_min(1e-30)
    return num / den[:, None]


def align_gauge(shared: torch.Tensor, reference: torch.Tensor, cov: torch.Tensor,
                max_condition: float = 1e6) -> torch.Tensor:
    """Re-express a shared projection ``W`` (any invertible ``R W`` fits as well) as close to ``reference``.

    The fits fix ``W`` only up to an invertible map that the per-head maps absorb; choosing
    ``R = argmin E||(R W - reference) x||^2`` keeps the new projection on the scale of the original ones, which
    matters for low-precision inference and for the layer-wise optimiser. Left alone if ``R`` is ill-conditioned.
    """
    gram = shared @ cov @ shared.T
    align = reference @ cov @ shared.T @ torch.linalg.pinv(gram, hermitian=True)
    svals = torch.linalg.svdvals(align)
    if svals.min() <= svals.max() / max_condition:
        return shared
    return align @ shared


def kv_head_similarity(k_rows: torch.Tensor, v_rows: torch.Tensor, cov: torch.Tensor, first: torch.Tensor,
                       second: torch.Tensor, passthrough: torch.Tensor) -> torch.Tensor:
    """``(KV, KV)`` similarity of KV heads: one minus the relative error of merging the two with the fits.

    For each pair of heads, under the input second moment ``cov``: keys, per rotary pair, the fraction of their
    energy that the complex rank-1 fit leaves out; the non-rotary key dimensions and the values, the fraction
    outside the best shared ``m``-dimensional projection of the two heads' ``m`` rows. 1 means that merging the
    two costs nothing (one head is a foldable map of the other); the parts are averaged.

    Args:
        k_rows, v_rows: ``(KV, d, P)`` projection rows (bias as the last column when ``cov`` has one).
        cov: ``(P, P)`` input second moment.
    """
    root, _ = symmetric_sqrt(cov)
    kv = k_rows.shape[0]
    parts = []
    if len(first):
        keys = to_complex_pairs(k_rows, first, second) @ root.to(torch.complex128)  # (KV, pairs, P)
        energy = (keys.abs() ** 2).sum(-1)  # (KV, pairs)
        a, b = energy[:, None], energy[None]
        cross = torch.einsum("ipx,jpx->ijp", keys, keys.conj()).abs() ** 2
        smallest = (a + b) / 2 - (((a - b) / 2) ** 2 + cross).clamp_min(0).sqrt()  # 2x2 Gram's low eigenvalue
        parts.append(smallest.sum(-1) / (a + b).sum(-1).clamp_min(1e-30))
    for rows in ([k_rows[:, passthrough]] if len(passthrough) else []) + [v_rows]:
        feats = rows @ root  # (KV, m, P)
        m = feats.shape[1]
        both = torch.cat([feats[:, None].expand(kv, kv, *feats.shape[1:]),
                          feats[None].expand(kv, kv, *feats.shape[1:])], dim=2)  # (KV, KV, 2m, P)
        svals = torch.linalg.svdvals(both) ** 2
        parts.append(svals[..., m:].sum(-1) / svals.sum(-1).clamp_min(1e-30))
    return 1.0 - sum(parts) / len(parts)


def group_query_heads(similarity: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Split query heads into ``num_groups`` equal groups of mutually similar heads (greedy, deterministic).

    The lowest unassigned head seeds a group, which takes its most similar unassigned heads. Heads that shared a
    KV head have similarity 1, so they stay together whenever the group size allows.

    Args:
        similarity: ``(H, H)`` symmetric.

    Returns:
        Groups of original query-head indices, each sorted, ordered by their first head.
    """
    heads = similarity.shape[0]
    if num_groups < 1 or heads % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {heads} heads")
    size = heads // num_groups
    free = list(range(heads))
    groups = []
    while free:
        seed = free[0]
        ranked = sorted(free[1:], key=lambda h: (-float(similarity[seed, h]), h))
        group = sorted([seed] + ranked[: size - 1])
        groups.append(group)
        free = [h for h in free if h not in group]
    return groups


# ---------------------------------------------------------------------------------------------------------------
# One attention block: fit the shared keys/values of each group and fold the per-head maps into q / o.
# ---------------------------------------------------------------------------------------------------------------


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(..., d, D)`` rows and ``(..., d)`` bias -> ``(..., d, D + 1)`` rows acting on ``[x; 1]``."""
    bias = bias if bias is not None else weight.new_zeros(weight.shape[:-1])
    return torch.cat([weight, bias[..., None]], dim=-1)


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
                   pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    """Shared key projection of one group and the query rows of its heads with their key maps folded in.

    Returns:
        ``(k_weight (d, D), k_bias (d,) or None, [q rows (d, D + 1) per head of the group])``.
    """
    first, second, passthrough = pairs
    queries = [_augmented(w.q_weight[h], None if w.q_bias is None else w.q_bias[h]).double() for h in group]
    keys = _augmented(w.k_weight, w.k_bias).double()  # (KV, d, P)
    if w.k_bias is None:  # no bias parameter to hold a constant: fit in the space of x alone
        keys, key_cov = keys[..., :-1], input_moment[:-1, :-1]
    else:
        key_cov = input_moment
    shared = keys.new_zeros(keys.shape[1:])
    if len(first):
        rows = torch.stack([to_complex_pairs(keys[source_kv[h]], first, second) for h in group], dim=1)
        energy = torch.stack([((q[first] @ input_moment) * q[first]).sum(-1)
                              + ((q[second] @ input_moment) * q[second]).sum(-1) for q in queries], dim=1)
        pair_keys, scales = complex_rank1_fit(rows, energy, key_cov)
        shared[first], shared[second] = pair_keys.real, pair_keys.imag
        # k_h ~ c_h k  =>  Re(conj(q) c_h k) = Re(conj(conj(c_h) q) k): head h's query takes conj(c_h).
        queries = [apply_pair_scales(q, scales[:, i].conj(), first, second) for i, q in enumerate(queries)]
    if len(passthrough):
        targets = [keys[source_kv[h]][passthrough] for h in group]
        lefts = [q[passthrough] @ input_moment @ q[passthrough].T for q in queries]  # query covariance
        fit, _ = reduced_rank_fit(targets, key_cov, len(passthrough), lefts)
        fit = align_gauge(fit, sum(targets) / len(targets), key_cov)
        maps = least_squares_maps(targets, [key_cov] * len(targets), fit)
        shared[passthrough] = fit
        for q, m in zip(queries, maps):
            q[passthrough] = m.T @ q[passthrough]  # q^T (M k) = (M^T q)^T k
    if w.k_bias is None:
        return shared, None, queries
    return shared[:, :-1], shared[:, -1], queries


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
                          refine_steps: int = 0) -> AttentionWeights:
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
            k_weight, k_bias, queries = fit_group_keys(w, stats.input_moment, group, source_kv, pairs)
            new["k_weight"][g] = k_weight
            if k_bias is not None:
                new["k_bias"][g] = k_bias
            for slot, q in zip(slots, queries):
                new["q_weight"][slot] = q[:, :-1]
                if new["q_bias"] is not None:
                    new["q_bias"][slot] = q[:, -1]
    return base.replace(**{k: (None if v is None else v.to(w.q_weight.dtype)) for k, v in new.items()})


# ---------------------------------------------------------------------------------------------------------------
# The registered conversion methods.
# ---------------------------------------------------------------------------------------------------------------

# L-BFGS iterations polishing the value fit where heads see different attention-mixed inputs.
VALUE_REFINE_STEPS = 30


def _choose_groups(w: AttentionWeights, stats, num_groups: int, pairs, by_similarity: bool) -> list[list[int]]:
    from .pooling import contiguous_groups

    heads = w.num_heads
    if num_groups == 1 or not by_similarity:
        return contiguous_groups(heads, num_groups)
    cov = stats.input_moment
    kv_sim = kv_head_similarity(_augmented(w.k_weight, w.k_bias).double(), _augmented(w.v_weight, w.v_bias).double(),
                                cov, *pairs)
    source_kv = torch.tensor([h // (heads // w.num_kv_heads) for h in range(heads)])
    return group_query_heads(kv_sim[source_kv][:, source_kv], num_groups)


def _data_aware(model, spec, weights, num_key_value_heads, cfg, calibration_data, tokenizer, fit_keys=True):
    import logging
    import time

    from .convert import mean_pool_attention
    from .statistics import (AttentionProbabilitiesUnavailable, calibration_blocks, collect_attention_statistics,
                             has_qk_norm, rotary_dim)

    logger = logging.getLogger(__name__)
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
    pad = None
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        stats = collect_attention_statistics(model, spec, weights, blocks, pad_token_id=pad)
    except AttentionProbabilitiesUnavailable as err:
        if cfg.method != "auto":
            raise
        logger.warning("GQA method 'auto': %s; falling back to mean pooling.", err)
        return [mean_pool_attention(w, spec, num_key_value_heads) for w in weights], {
            "method": "mean", "fallback_reason": str(err)}
    collected = time.perf_counter()
    rot = rotary_dim(model.config, head_dim, spec.attention.rope)
    pairs = rotary_pairs(head_dim, rot, spec.attention.rope)
    # Reordering query heads needs per-head query norms to move with them; those families keep contiguous groups.
    by_similarity = cfg.group_by_similarity and not (qk_norm and spec.attention.kv_norm_layout != "shared")
    new_weights, layer_groups = [], []
    for w, s in zip(weights, stats):
        groups = _choose_groups(w, s, num_key_value_heads, pairs, by_similarity)
        layer_groups.append(groups)
        new_weights.append(merge_attention_heads(w, s, spec, groups, pairs, fit_keys, VALUE_REFINE_STEPS))
    same = all(g == layer_groups[0] for g in layer_groups)
    extra.update({
        "method": "data_aware" if fit_keys else "data_aware_values",
        "groups": layer_groups[0] if same else layer_groups,
        "groups_per_layer": not same,
        "calibration_data": "self-sampled" if calibration_data is None else type(calibration_data).__name__,
        "calibration_tokens": stats[0].tokens,
        "rotary_dim": rot,
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
