"""Calibration statistics of attention blocks, collected with forward hooks on the original model.

One forward pass over the calibration blocks, with eager attention so that every block returns its attention
probabilities (whatever the family does to get them: scaling, soft-capping, sliding windows, ALiBi), accumulates
per layer (legend in :mod:`hf_llmopt.gqa.data_aware`)::

    input_moment   (P, P)     E[x x^T],  x = [hidden_states; 1] the normed input of the attention block
    value_moments  (H, U, U)  E[z_h z_h^T],  z_h(t) = sum_u A_h(t, u) [V x(u); 1]   (U = KV * d + 1)
    static_key_moments  (H, m(m+1)/2, r(r+1)/2)  r = KV * m, on m static key dimensions (optional, below)

``input_moment`` is all the key fit needs (query energies and key errors are quadratic forms in it);
``value_moments`` keep the attention-mixed inputs of each query head in the span of the original value
projections, where the optimal shared value projection lies, so they stay small (193 x 193 for SmolLM2 instead
of 577 x 577 per head). Memory is bounded by these moments, whatever the number of calibration tokens.

``static_key_moments`` serve the key dimensions that RoPE barely turns (:func:`~hf_llmopt.gqa.fits.static_pairs`),
whose per-head key maps may be any linear map: ``E_t[q_h(t) q_h(t)^T (x) Cov_{u <= t} k(u)]``, the query of head
``h`` on those dimensions times the covariance of all KV heads' keys on them over the prefix that query attends to.
The logit error of a merged key is a quadratic form in it, coupled by position and blind to any key error that is the
same over a prefix, as the softmax is (:func:`~hf_llmopt.gqa.fits.joint_static_key_fit`). Both factors are symmetric,
so only their upper triangles are kept (:func:`unpack_static_key_moments`); they are accumulated in float64.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .._compat import rope_parameters
from ..architectures import ArchSpec
from ..data import DataTooShortError, pack_samples, query_positions, sampling_pad_token_id, token_blocks
from ..evaluation import eval_mode
from .layout import AttentionWeights, augmented_rows

logger = logging.getLogger(__name__)


class AttentionProbabilitiesUnavailable(NotImplementedError):
    """The family's attention module does not return its attention probabilities, even in eager mode."""


class _StopForward(Exception):
    """Raised by the last layer's hook: nothing after the last attention block is needed."""


@dataclass
class LayerStatistics:
    input_moment: torch.Tensor  # (P, P) float64, over key positions
    value_moments: torch.Tensor  # (H, U, U) float64, over query positions
    query_moment: torch.Tensor  # (P, P) float64, over query positions
    tokens: int = 0
    static_dims: torch.Tensor | None = None  # (m,) head dimensions of static_key_moments
    # (H, m (m + 1) / 2, r (r + 1) / 2) float64 over query positions, r = KV * m: the upper triangles of the
    # symmetric (m, m) and (r, r) factors (unpack_static_key_moments)
    static_key_moments: torch.Tensor | None = None


# Largest static_key_moments collected per layer (entries); beyond it the static dimensions keep the fit from the
# input and query moments alone. SmolLM2 with 8 static pairs needs 1.4M (11.5 MB in float64).
MAX_STATIC_KEY_MOMENT_ENTRIES = 2**22


def static_key_moment_shape(num_heads: int, num_kv_heads: int, dims: int) -> tuple[int, int, int]:
    """Shape of :attr:`LayerStatistics.static_key_moments` for ``dims`` static key dimensions."""
    span = num_kv_heads * dims
    return num_heads, dims * (dims + 1) // 2, span * (span + 1) // 2


def static_key_moment_entries(num_heads: int, num_kv_heads: int, dims: int) -> int:
    """How many entries :attr:`LayerStatistics.static_key_moments` has for ``dims`` static key dimensions."""
    heads, query_pairs, key_pairs = static_key_moment_shape(num_heads, num_kv_heads, dims)
    return heads * query_pairs * key_pairs


def unpack_static_key_moments(packed: torch.Tensor, m: int) -> torch.Tensor:
    """One head's ``(m (m + 1) / 2, r (r + 1) / 2)`` packed moments -> the full ``(m, m, r, r)`` tensor."""
    r = round(((8 * packed.shape[1] + 1) ** 0.5 - 1) / 2)
    qi, qj = (i[:, None] for i in torch.triu_indices(m, m))
    ka, kb = (i[None, :] for i in torch.triu_indices(r, r))
    full = packed.new_zeros(m, m, r, r)
    for i, j in ((qi, qj), (qj, qi)):
        for a, b in ((ka, kb), (kb, ka)):
            full[i, j, a, b] = packed
    return full


def minimum_calibration_tokens(head_dim: int) -> int:
    """Fewest calibration tokens accepted: ``max(512, 4 * head_dim)``.

    The fits invert second moments of head_dim-sized projections (per head, per group); with fewer samples than a
    few times their size the estimates are rank-deficient noise, and the "data-aware" fit would overfit it.
    """
    return max(512, 4 * head_dim)


# Per conversion (see shared_calibration_blocks): calibration_blocks' results by their arguments.
_BLOCKS_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hf_llmopt_calibration_blocks",
                                                                            default=None)


@contextlib.contextmanager
def shared_calibration_blocks():
    """Within this block, :func:`calibration_blocks` builds the blocks once per model, data source and settings.

    One conversion asks for them up to three times (the closed-form statistics, the layer-wise stage and the
    logit-scale search); a user's dataset is then loaded and tokenized once. The memo is keyed by the identity of
    the objects passed, which the caller keeps alive for the whole block, and is dropped at its end.
    """
    token = _BLOCKS_MEMO.set({})
    try:
        yield
    finally:
        _BLOCKS_MEMO.reset(token)


def calibration_blocks(model, calibration_data, tokenizer, cfg, head_dim: int) -> torch.Tensor:
    """``(N, T)`` calibration token ids from any data source (``None``: text sampled from the model itself, packed
    by :func:`~hf_llmopt.data.pack_samples`). Built once per conversion (:func:`shared_calibration_blocks`).

    Raises:
        ValueError: ``calibration_data`` is ``None`` and no tokenizer was given (sampling needs one).
        DataTooShortError: fewer than :func:`minimum_calibration_tokens` tokens.
    """
    memo = _BLOCKS_MEMO.get()
    key = (id(model), id(calibration_data), id(tokenizer), cfg.calibration_tokens, cfg.calibration_seq_len, cfg.seed,
           head_dim)
    if memo is not None and key in memo:
        return memo[key]
    blocks = _build_calibration_blocks(model, calibration_data, tokenizer, cfg, head_dim)
    if memo is not None:
        memo[key] = blocks
    return blocks


def _build_calibration_blocks(model, calibration_data, tokenizer, cfg, head_dim: int) -> torch.Tensor:
    if calibration_data is None and tokenizer is None:
        raise ValueError(
            "data-aware GQA conversion needs calibration text: pass tokenizer= (the default calibration data is "
            "chat text sampled from the model itself) or calibration_data= (texts, a dataset, a file or token ids)"
        )
    need = minimum_calibration_tokens(head_dim)
    try:
        blocks = token_blocks(calibration_data, tokenizer, model=model, num_tokens=cfg.calibration_tokens,
                              seq_len=cfg.calibration_seq_len, seed=cfg.seed, min_tokens=need)
        if calibration_data is None:  # self-sampled: packed, without the padding after each reply
            blocks = pack_samples(blocks, sampling_pad_token_id(tokenizer))
    except DataTooShortError as err:
        raise DataTooShortError(
            f"data-aware GQA conversion needs at least {need} calibration tokens (max(512, 4 * head_dim)) for "
            f"stable second-moment estimates: {err}"
        ) from err
    if blocks.numel() < need:
        raise DataTooShortError(
            f"data-aware GQA conversion needs at least {need} calibration tokens (max(512, 4 * head_dim)) for "
            f"stable second-moment estimates; the calibration data holds {blocks.numel()}"
        )
    max_blocks = max(1, -(-cfg.calibration_tokens // blocks.shape[1]))
    return blocks[:max_blocks]


def rotary_dim(config, head_dim: int, rope: str) -> int:
    """How many leading head dimensions RoPE rotates (partial rotary: phi, stablelm, gpt_neox, gptj, glm)."""
    if rope == "none":
        return 0
    explicit = getattr(config, "rotary_dim", None)  # gptj
    if explicit:
        return int(explicit)
    params = rope_parameters(config)
    nested = [v for v in params.values() if isinstance(v, dict)]  # per layer type (gemma3)
    factor = params.get("partial_rotary_factor")
    for sub in nested:
        factor = factor if factor is not None else sub.get("partial_rotary_factor")
    for name in ("partial_rotary_factor", "rotary_pct"):
        factor = factor if factor is not None else getattr(config, name, None)
    dim = int(head_dim * (1.0 if factor is None else float(factor)))
    return dim - dim % 2


def rotary_inv_freq(model, rotary_dim: int) -> torch.Tensor:
    """``(rotary_dim // 2,)`` RoPE inverse frequencies: the model's own buffer (so scaled RoPE is respected), else
    the default ``base ** (-2i / rotary_dim)`` from ``rope_theta``."""
    for name, buffer in model.named_buffers():
        if name.endswith("inv_freq") and buffer.numel() == rotary_dim // 2:
            return buffer.detach().double().flatten()
    params = rope_parameters(model.config)
    base = params.get("rope_theta") or getattr(model.config, "rope_theta", None) or 10000.0
    return float(base) ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def context_length(config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` and its aliases)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def eager_attention(model):
    """Temporarily run ``model`` with eager attention, which returns the attention probabilities."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def value_stack(w: AttentionWeights) -> torch.Tensor:
    """``(U, P)`` map from ``x = [hidden; 1]`` to ``[V x; 1]``: every KV head's value rows (with bias) and a 1."""
    kv, d, dim = w.v_weight.shape
    rows = augmented_rows(w.v_weight, w.v_bias).reshape(kv * d, dim + 1)
    const = torch.zeros(1, dim + 1, dtype=rows.dtype)
    const[0, -1] = 1.0
    return torch.cat([rows, const])


# Weight each position by 1 / (residual stream energy): the next norm divides the attention output by the residual's
# RMS, so an error matters relative to it. Without this the first token, whose residual carries "massive
# activations" (RMS 1000 against 6 elsewhere in SmolLM2's middle layers), dominates every second moment.
TOKEN_WEIGHTING = True


class _ResidualScale:
    """Keeps the per-position mean square of a decoder layer's input (the residual stream)."""

    def __init__(self, layer: nn.Module):
        self.energy: torch.Tensor | None = None
        self.handle = layer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.energy = hidden.detach().float().pow(2).mean(-1)  # (B, T)

    def weights(self, mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``mask / max(residual energy, attention-output energy)`` per position, ``(B, T)``."""
        if not TOKEN_WEIGHTING or self.energy is None:
            return mask
        energy = torch.maximum(self.energy, output.detach().float().pow(2).mean(-1))
        return mask / energy.clamp_min(1e-12)


def _prefix_covariance(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, r)`` keys and ``(B, T)`` key mask -> ``(B, T, r, r)``: covariance of the keys at positions ``<= t``."""
    keys = keys * mask[..., None]
    count = mask.cumsum(1).clamp_min(1)[..., None]
    mean = keys.cumsum(1) / count
    second = (keys[..., :, None] * keys[..., None, :]).cumsum(1) / count[..., None]
    return second - mean[..., :, None] * mean[..., None, :]


class _StatisticsHook:
    def __init__(self, weights: AttentionWeights, stats: LayerStatistics, last: bool, family: str,
                 scale: _ResidualScale):
        self.scale = scale
        self.values = value_stack(weights)
        if stats.static_key_moments is not None:  # (H, m, P) and (KV, m, P) rows on the static dims, acting on [x; 1]
            self.static_rows = (augmented_rows(weights.q_weight, weights.q_bias)[:, stats.static_dims].double(),
                                augmented_rows(weights.k_weight, weights.k_bias)[:, stats.static_dims].double())
        self.stats = stats
        self.last = last
        self.family = family
        self.mask: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
            raise AttentionProbabilitiesUnavailable(
                f"the {self.family!r} attention module does not return its attention probabilities in eager mode, "
                "which the data-aware fits need"
            )
        x = hidden.float()
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)  # (B, T, P)
        flat = x.reshape(-1, x.shape[-1])
        mask = self.mask.reshape(-1, 1)  # key positions: every real token counts the same
        weight = self.scale.weights(self.mask, output[0])[..., None]  # query positions: (B, T, 1)
        self.stats.input_moment += ((flat * mask).T @ flat).double()
        self.stats.query_moment += ((flat * weight.reshape(-1, 1)).T @ flat).double()
        values = x @ self.values.T  # (B, T, U)
        mixed = probs.float() @ values[:, None]  # (B, H, T, U): z_h(t)
        heads = mixed.shape[1]
        mixed = mixed.transpose(0, 1).reshape(heads, -1, mixed.shape[-1])  # (H, B*T, U)
        weighted = mixed * weight.reshape(1, -1, 1)
        self.stats.value_moments += torch.bmm(weighted.transpose(1, 2), mixed).double()
        if self.stats.static_key_moments is not None:
            self._static_keys(x, weight[..., 0])
        self.stats.tokens += int(self.mask.sum())
        if self.last:
            raise _StopForward

    def _static_keys(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """Accumulate ``static_key_moments`` from ``x = [hidden; 1]`` and the query weights ``(B, T)``."""
        # float64 throughout: a prefix covariance is a difference of running sums, and the fit exploits any
        # negative eigenvalue that rounding leaves in the moments (a heads-are-mergeable model then fits badly)
        x = x.double()
        q_rows, k_rows = self.static_rows
        q = torch.einsum("btp,hmp->bthm", x, q_rows)
        k = torch.einsum("btp,kmp->btkm", x, k_rows).flatten(2)  # (B, T, KV * m)
        rows, cols = torch.triu_indices(k.shape[-1], k.shape[-1])
        cov = _prefix_covariance(k, self.mask.double())[..., rows, cols].flatten(0, 1)  # (B * T, r (r + 1) / 2)
        rows, cols = torch.triu_indices(q.shape[-1], q.shape[-1])
        qq = (q[..., rows] * q[..., cols] * weight[..., None, None]).flatten(0, 1)  # (B * T, H, m (m + 1) / 2)
        self.stats.static_key_moments += qq.permute(1, 2, 0) @ cov


def forward_batches(model, blocks: torch.Tensor, batch_size: int, handles: list, before_batch=None,
                    progress: str | None = None) -> None:
    """Run ``model`` in eval mode over ``blocks`` in batches, each stopped where a hook raises ``_StopForward``.

    ``before_batch(start)`` runs before each batch. The hook ``handles`` are removed and the training flag restored
    at the end, also on error.
    """
    from tqdm.auto import tqdm

    starts = range(0, blocks.shape[0], batch_size)
    try:
        with eval_mode(model):
            for start in (tqdm(starts, desc=progress, unit="batch") if progress else starts):
                if before_batch is not None:
                    before_batch(start)
                try:
                    model(input_ids=blocks[start:start + batch_size], use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_attention_statistics(model, spec: ArchSpec, weights: list[AttentionWeights], blocks: torch.Tensor,
                                 batch_size: int = 8, pad_token_id: int | None = None,
                                 static_dims: torch.Tensor | None = None) -> list[LayerStatistics]:
    """Second moments of every attention block of ``model`` over ``blocks`` (see the module docstring).

    Args:
        model: the original causal LM (left as it was; its attention implementation is restored).
        spec: its architecture entry.
        weights: its canonical attention weights per layer (fp32), used to map inputs into value space.
        blocks: ``(N, T)`` token ids.
        pad_token_id: trailing runs of this token are left out (see :func:`query_positions`).
        static_dims: head dimensions to collect ``static_key_moments`` on (none when ``None`` or empty).

    Raises:
        AttentionProbabilitiesUnavailable: the family's attention does not expose its probabilities.
    """
    from .convert import get_attention, get_decoder_layers

    layers = get_decoder_layers(model, spec)
    dim = weights[0].q_weight.shape[-1] + 1
    units = weights[0].v_weight.shape[0] * weights[0].head_dim + 1
    heads = weights[0].num_heads
    kv = weights[0].num_kv_heads
    static = static_dims is not None and len(static_dims) > 0
    m = len(static_dims) if static else 0
    stats = [LayerStatistics(torch.zeros(dim, dim, dtype=torch.float64),
                             torch.zeros(heads, units, units, dtype=torch.float64),
                             torch.zeros(dim, dim, dtype=torch.float64),
                             static_dims=static_dims if static else None,
                             static_key_moments=torch.zeros(static_key_moment_shape(heads, kv, m),
                                                            dtype=torch.float64) if static else None)
             for _ in layers]
    scales = [_ResidualScale(layer) for layer in layers]
    hooks = [_StatisticsHook(w, s, last=i == len(layers) - 1, family=model.config.model_type, scale=sc)
             for i, (w, s, sc) in enumerate(zip(weights, stats, scales))]
    masks = query_positions(blocks, pad_token_id)
    handles = [get_attention(layer, spec).register_forward_hook(hook, with_kwargs=True)
               for layer, hook in zip(layers, hooks)] + [sc.handle for sc in scales]

    def set_masks(start: int) -> None:
        for hook in hooks:
            hook.mask = masks[start:start + batch_size]

    with eager_attention(model):
        forward_batches(model, blocks, batch_size, handles, set_masks,
                        progress="Collecting GQA calibration statistics")
    for s in stats:
        s.input_moment /= max(s.tokens, 1)
        s.value_moments /= max(s.tokens, 1)
        s.query_moment /= max(s.tokens, 1)
        if s.static_key_moments is not None:
            s.static_key_moments /= max(s.tokens, 1)
    return stats


def has_qk_norm(model, spec: ArchSpec) -> bool:
    """Whether the attention blocks normalise queries or keys after projection (qwen3, olmo2, phi with qk norm)."""
    from .convert import get_attention, get_decoder_layers

    attention = get_attention(get_decoder_layers(model, spec)[0], spec)
    names = [n for n in (spec.attention.kv_norm, spec.attention.q_norm) if n]
    return any(isinstance(getattr(attention, n, None), nn.Module) for n in names)
