"""Pure tensor math of the data-aware KV-head merge: reduced-rank fits, RoPE pairs, complex rank-1 key fits.

No modules and no configs here (:mod:`hf_llmopt.gqa.data_aware` applies these to attention blocks). Dimension
legend (as :mod:`hf_llmopt.gqa.pooling`)::

    P      input features of a fit (hidden size, +1 for a bias)      r  rank of a shared projection
    n      heads fitted together (one group)                        m  rows each head needs (head_dim, or fewer)
    pairs  RoPE frequency pairs of a head                           KV heads before a merge

The two ideas, each tested against a naive reference in ``tests/test_gqa_data_aware.py``:

* a projection shared by ``n`` heads plus a per-head map folded elsewhere is a reduced-rank regression
  (:func:`reduced_rank_fit`);
* a per-head map on RoPE keys must commute with the rotation, so on each frequency pair it is a complex scalar
  (:func:`apply_pair_scales`), and the shared key is a complex rank-1 fit (:func:`complex_rank1_fit`).
"""

from __future__ import annotations

import torch

# Eigenvalues below this fraction of the largest are treated as zero when whitening a covariance: calibration
# data never fills every direction of a 577-dim input space evenly.
RELATIVE_EIGEN_FLOOR = 1e-7


def _floored_eigh(cov: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenpairs of ``cov`` symmetrised, and which eigenvalues exceed ``floor`` times the largest."""
    eigval, eigvec = torch.linalg.eigh(0.5 * (cov + cov.mH))
    keep = eigval > floor * eigval.amax(-1, keepdim=True).clamp_min(torch.finfo(eigval.dtype).tiny)
    return eigval, eigvec, keep


def symmetric_sqrt(cov: torch.Tensor, floor: float = RELATIVE_EIGEN_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C^{1/2}, C^{+1/2})`` of a PSD (or Hermitian PSD, or a batch of them): root and pseudo-inverse root.

    Directions with eigenvalue below ``floor * max`` are dropped from the inverse (the data says nothing there).
    """
    eigval, eigvec, keep = _floored_eigh(cov, floor)
    tiny = torch.finfo(eigval.dtype).tiny
    inv = torch.where(keep, eigval.clamp_min(tiny).rsqrt(), torch.zeros_like(eigval))
    root = (eigvec * eigval.clamp_min(0).sqrt().unsqueeze(-2).to(eigvec.dtype)) @ eigvec.mH
    inv_root = (eigvec * inv.unsqueeze(-2).to(eigvec.dtype)) @ eigvec.mH
    return root, inv_root


def psd_part(cov: torch.Tensor, floor: float = RELATIVE_EIGEN_FLOOR) -> torch.Tensor:
    """``cov`` symmetrised, with eigenvalues below ``floor * max`` (negative ones included) set to zero.

    Second moments accumulated in fp32 over a rank-deficient feature space (KV heads that copy each other, a
    constant feature) come out with eigenvalues of about ``-1e-7`` of the largest. An objective that divides by
    ``W C W^T`` can then be driven below zero along those directions; the optimiser in :func:`reduced_rank_fit`
    found such directions and returned a projection that wrecked the model.
    """
    eigval, eigvec, keep = _floored_eigh(cov, floor)
    kept = torch.where(keep, eigval, torch.zeros_like(eigval))
    return (eigvec * kept.unsqueeze(-2).to(eigvec.dtype)) @ eigvec.mH


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
    cleaned = {id(c): psd_part(c) for c in covariances}  # one object per distinct covariance, as given
    covariances = [cleaned[id(c)] for c in covariances]
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
    """``(rank, P)``: top eigenvectors of ``matrix`` relative to the covariance whose ``C^{+1/2}`` is given.

    Rows beyond ``P`` (a head wider than the input) are zero: ``P`` rows already span everything.
    """
    whitened = inv_root @ matrix @ inv_root
    _, eigvec = torch.linalg.eigh(0.5 * (whitened + whitened.T))
    top = (inv_root @ eigvec[:, -rank:].flip(-1)).T  # strongest direction first
    return torch.cat([top, top.new_zeros(rank - top.shape[0], top.shape[1])])


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


def joint_static_key_fit(moments, targets, max_iterations: int = 50, tolerance: float = 1e-5):
    """A shared ``(m, r)`` key map ``W`` and per-head query maps ``B_h`` from joint query-key moments.

    On key dimensions that RoPE does not turn, head ``h``'s logit error at query ``t`` and key ``u`` is
    ``q_t^T (B_h W - T_h) k_u`` (``k`` stacks the original KV heads' keys; ``T_h`` selects head ``h``'s). Only its
    variation over the keys a query sees changes the softmax, so the objective is
    ``sum_h sum_{i,j,a,b} D_ia D_jb F_h[i, j, a, b]``, ``D = B_h W - T_h``, with
    ``F_h = E_t[q_t q_t^T (x) Cov_{u <= t} k_u]``
    (:attr:`~hf_llmopt.gqa.statistics.LayerStatistics.static_key_moments`).
    Unlike :func:`reduced_rank_fit` on separate query and key moments, this keeps which queries meet which keys.

    Alternating least squares from ``W`` = the mean of ``T_h``: each step solves one side exactly, so the objective
    never rises. The normal equations are contracted on the ``(m, m, r, r)`` moments directly (``O(m^3 r^2)`` per
    head and round). On SmolLM2's moments (8 static pairs, 4 layers tried) this converges within 0.01% of the
    objective that 150 L-BFGS steps on ``W`` reach (with every ``B_h`` solved for it), in a fraction of the time.

    Args:
        moments: ``n`` PSD tensors ``(m, m, r, r)``.
        targets: ``n`` tensors ``(m, r)``.
        max_iterations, tolerance: stop after this many rounds or when a round lowers the objective by less than
            ``tolerance`` of it (0 rounds: ``W`` stays the mean, only the ``B_h`` are solved).

    Returns:
        ``(W (m, r), [B_h (m, m)], objective)``.
    """
    m, r = targets[0].shape
    pulled = [torch.einsum("ijab,jb->ia", f, t) for f, t in zip(moments, targets)]  # F_h applied to T_h

    def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = 0.5 * (a + a.T)
        factor, info = torch.linalg.cholesky_ex(a + 1e-10 * a.diagonal().mean().clamp_min(1e-300) * torch.eye(
            a.shape[0], dtype=a.dtype))
        if info == 0:
            return torch.cholesky_solve(b[:, None], factor)[:, 0]
        return torch.linalg.pinv(a, hermitian=True) @ b  # rank-deficient (heads that ignore these dimensions)

    def query_maps(shared):  # normal equations of each B_h in vec(B) (i, s)
        return [solve(torch.einsum("sa,ijat->isjt", shared, torch.einsum("ijab,tb->ijat", f, shared)).reshape(
            m * m, m * m), (p @ shared.T).reshape(-1)).reshape(m, m) for f, p in zip(moments, pulled)]

    def objective(shared, maps):
        return float(sum(torch.einsum("ia,ijab,jb->", d, f, d) for f, t, b in zip(moments, targets, maps)
                         for d in [b @ shared - t]))

    shared = sum(targets) / len(targets)
    maps = query_maps(shared)
    value = objective(shared, maps)
    for _ in range(max_iterations):  # normal equations of W in vec(W) (s, a)
        normal = sum(torch.einsum("sjab,jt->satb", torch.einsum("is,ijab->sjab", b, f), b)
                     for f, b in zip(moments, maps)).reshape(m * r, m * r)
        shared = solve(normal, sum(b.T @ p for b, p in zip(maps, pulled)).reshape(-1)).reshape(m, r)
        maps = query_maps(shared)
        previous, value = value, objective(shared, maps)
        if previous - value <= tolerance * abs(previous):
            break
    return shared, maps, value


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
        cov: ``(P, P)`` real second moment of the inputs, or ``(pairs, P, P)`` Hermitian ``E[x x^H]`` per pair.

    Returns:
        ``(shared (pairs, P) complex, scales (pairs, n) complex)``.
    """
    cov = cov.to(rows.dtype).expand(rows.shape[0], *cov.shape[-2:])
    root, inv_root = symmetric_sqrt(cov)
    whitened = weights.sqrt().to(rows.dtype)[..., None] * (rows @ root)  # (pairs, n, P)
    _, _, vh = torch.linalg.svd(whitened, full_matrices=False)
    shared = (vh[:, :1, :] @ inv_root)[:, 0]  # (pairs, P): shared C^{1/2} = top right singular vector
    scales = _complex_scales(rows, shared, cov)
    mean_scale = (weights.to(rows.dtype) * scales).sum(-1) / weights.sum(-1).clamp_min(1e-30).to(rows.dtype)
    fix = torch.where(mean_scale.abs() > 1e-12, mean_scale, torch.ones_like(mean_scale))
    return shared * fix[:, None], scales / fix[:, None]


def _complex_scales(rows: torch.Tensor, shared: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Least-squares ``c[p, h] = <rows[p, h], shared[p]>_C / <shared[p], shared[p]>_C``, ``<a, b>_C = a C b^H``."""
    shared_cov = (shared[:, None, :] @ cov.mH)[:, 0]  # (pairs, P): conj of C shared^H, as a row
    num = (rows * shared_cov.conj()[:, None, :]).sum(-1)
    den = (shared * shared_cov.conj()).sum(-1).real.clamp_min(1e-30)
    return num / den[:, None]


def static_pairs(inv_freq: torch.Tensor, context: int | None, max_angle: float) -> torch.Tensor:
    """``(pairs,)`` bool: pairs that RoPE turns by at most ``max_angle`` radians across the whole context.

    Over the model's context window these pairs are (almost) not rotated, so a per-head map on them need not
    commute with RoPE: they are fitted like the non-rotary dimensions, with any linear map (from joint query-key
    moments, :func:`joint_static_key_fit`). The map's part that does not commute errs by about ``2 sin(angle)`` of
    itself at the distance where the pair has turned by ``angle``, so the threshold trades short text against long
    range. SmolLM2 (base 1e5, 8192 positions) at 3 -> 1 KV heads: 8 of 32 pairs at 1.5 give 2.77x / 2.98x of the
    original's chat / prose perplexity on 256-token text and 11.8x on 2,048-token packed chat; 5 pairs at 0.5
    3.38x / 3.13x and 9.7x (see ``GQAConfig.static_rope_angle``, which sets ``max_angle``).
    """
    if not context:
        return torch.zeros_like(inv_freq, dtype=torch.bool)
    return inv_freq * context <= max_angle


def mean_retention(inv_freq: torch.Tensor, horizon: int) -> torch.Tensor:
    """``(pairs,)``: how much of a constant key error still changes the softmax, per rotary pair.

    Attention is invariant to adding the same amount to every logit of a query. A key error that is the same at
    every position shifts the logits of query ``t`` by ``Re(conj(q) e^{i theta (u - t)} dk)``, which varies over
    the keys ``u <= t`` only as much as the phase does: the fraction is ``1 - |mean_u e^{i theta u}|^2``,
    averaged over queries ``t < horizon``. Near 1 for fast pairs, near 0 for slow ones.
    """
    positions = torch.arange(horizon, dtype=torch.float64)
    phases = torch.polar(torch.ones(horizon, len(inv_freq), dtype=torch.float64),
                         positions[:, None] * inv_freq.double()[None])  # (T, pairs)
    running = phases.cumsum(0) / (positions[:, None] + 1)
    return (1 - running.abs() ** 2).mean(0)


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
