"""Read and write attention projections in one canonical per-head layout, whatever the family stores.

Canonical shapes (legend in :mod:`hf_llmopt.gqa.pooling`)::

    q_weight (H, d, D)    q_bias (H, d)     k_weight (KV, d, D)   k_bias (KV, d)
    v_weight (KV, d, D)   v_bias (KV, d)    o_weight (D_out, H, d) o_bias (D_out,)
    k_norm   {param name: (KV, d)} for per-head norms, {param name: (d,)} for a shared one

Every data transform (mean pooling, the data-aware merges) works on :class:`AttentionWeights` only; the readers
and writers below are the one place that knows each family's storage layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..architectures import AttentionSpec


@dataclass
class AttentionWeights:
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    v_weight: torch.Tensor
    o_weight: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    k_norm: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.q_weight.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_weight.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q_weight.shape[1]

    def replace(self, **changes) -> "AttentionWeights":
        return dataclasses.replace(self, **changes)

    def to(self, dtype: torch.dtype) -> "AttentionWeights":
        conv = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
        return AttentionWeights(
            **{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "k_norm"},
            k_norm={k: conv(v) for k, v in self.k_norm.items()},
        )


def augmented_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(..., d, D)`` rows and ``(..., d)`` bias -> ``(..., d, D + 1)`` rows acting on ``[x; 1]``."""
    bias = bias if bias is not None else weight.new_zeros(weight.shape[:-1])
    return torch.cat([weight, bias[..., None]], dim=-1)


def _linear_params(linear: nn.Module, heads: int, conv1d: bool = False):
    """(heads, d, D) weight and (heads, d) bias of an nn.Linear (or Conv1D, whose weight is (D, out))."""
    weight = linear.weight.detach()
    if conv1d:
        weight = weight.t()
    out_features = weight.shape[0]
    d = out_features // heads
    bias = linear.bias.detach().reshape(heads, d) if getattr(linear, "bias", None) is not None else None
    return weight.reshape(heads, d, -1), bias


def _o_params(module: nn.Module, spec: AttentionSpec, heads: int):
    o = getattr(module, spec.o)
    weight = o.weight.detach()
    if spec.o_conv1d:
        weight = weight.t()  # Conv1D stores (in, out); canonical is nn.Linear's (out, in)
    bias = o.bias.detach() if getattr(o, "bias", None) is not None else None
    return weight.reshape(weight.shape[0], heads, -1), bias


def _read_kv_norm(module: nn.Module, spec: AttentionSpec) -> dict[str, torch.Tensor]:
    if spec.kv_norm is None or spec.kv_norm_layout in ("none", "shared"):
        return {}
    norm = getattr(module, spec.kv_norm, None)
    if norm is None:  # optional norms (qk_layernorm=False, use_qk_norm=False)
        return {}
    if spec.kv_norm_layout == "module_list":
        out = {}
        names = {name for sub in norm.norms for name, _ in sub.named_parameters()}
        for name in names:
            out[name] = torch.stack([getattr(sub, name).detach() for sub in norm.norms])
        return out
    return {name: p.detach() for name, p in norm.named_parameters()}


def _split_rows(weight, bias, sizes):
    ws = weight.split(sizes, dim=0)
    bs = bias.split(sizes, dim=0) if bias is not None else (None,) * len(sizes)
    return ws, bs


def read_attention(module: nn.Module, spec: AttentionSpec, num_heads: int, num_kv_heads: int) -> AttentionWeights:
    """Canonical weights of one attention block stored in ``spec.layout``."""
    o_weight, o_bias = _o_params(module, spec, num_heads)
    d = o_weight.shape[-1]
    patched = getattr(module, "hf_llmopt_patched", False)  # hf_llmopt.gqa.patched: always separate q/k/v_proj
    if spec.layout == "separate" or patched:
        names = ("q_proj", "k_proj", "v_proj") if patched else (spec.q, spec.k, spec.v)
        q_w, q_b = _linear_params(getattr(module, names[0]), num_heads)
        k_w, k_b = _linear_params(getattr(module, names[1]), num_kv_heads)
        v_w, v_b = _linear_params(getattr(module, names[2]), num_kv_heads)
    else:
        fused = getattr(module, spec.qkv)
        weight = fused.weight.detach()
        bias = fused.bias.detach() if getattr(fused, "bias", None) is not None else None
        reader = FUSED_READERS.get(spec.layout)
        if reader is None:
            raise NotImplementedError(f"no reader for the {spec.layout!r} attention layout")
        (q_w, k_w, v_w), (q_b, k_b, v_b) = reader(module, weight, bias, num_heads, num_kv_heads, d)
        q_w, k_w, v_w = (w.reshape(-1, d, w.shape[-1]) for w in (q_w, k_w, v_w))
        q_b, k_b, v_b = (None if b is None else b.reshape(-1, d) for b in (q_b, k_b, v_b))
    return AttentionWeights(q_w, k_w, v_w, o_weight, q_b, k_b, v_b, o_bias, _read_kv_norm(module, spec))


def _read_fused_concat(module, weight, bias, h, kv, d):
    return _split_rows(weight, bias, [h * d, kv * d, kv * d])


def _read_conv1d_concat(module, weight, bias, h, kv, d):
    return _split_rows(weight.t(), bias, [h * d, kv * d, kv * d])


def _read_fused_heads(module, weight, bias, h, kv, d):
    # rows are per head [q_h; k_h; v_h]: (H, 3, d, D)
    w = weight.reshape(h, 3, d, -1)
    b = bias.reshape(h, 3, d) if bias is not None else None
    ws = tuple(w[:, i] for i in range(3))
    bs = tuple(b[:, i] for i in range(3)) if b is not None else (None, None, None)
    return ws, bs


def _read_falcon(module, weight, bias, h, kv, d):
    if module.new_decoder_architecture:
        # rows are per KV group [q_{g,0}; ...; q_{g,r-1}; k_g; v_g]: (KV, r + 2, d, D)
        w = weight.reshape(kv, h // kv + 2, d, -1)
        b = bias.reshape(kv, h // kv + 2, d) if bias is not None else None
        ws = (w[:, :-2], w[:, -2], w[:, -1])
        bs = (b[:, :-2], b[:, -2], b[:, -1]) if b is not None else (None, None, None)
        return ws, bs
    if module.multi_query:
        return _split_rows(weight, bias, [h * d, d, d])  # [q (H*d); k (d); v (d)]
    return _read_fused_heads(module, weight, bias, h, kv, d)


def _read_bigcode(module, weight, bias, h, kv, d):
    if module.multi_query:
        return _split_rows(weight, bias, [h * d, d, d])  # [q (H*d); k (d); v (d)]
    return _read_fused_heads(module, weight, bias, h, kv, d)  # viewed as (B, T, H, 3*d) per head


# layout -> fn(module, weight (out, D), bias (out,) | None, H, KV, d) -> ((q, k, v) rows, (q, k, v) biases)
FUSED_READERS: dict[str, Callable] = {
    "fused_concat": _read_fused_concat,
    "conv1d_concat": _read_conv1d_concat,
    "fused_heads": _read_fused_heads,
    "falcon": _read_falcon,
    "bigcode": _read_bigcode,
}


@torch.no_grad()
def _copy(param: torch.Tensor, value: torch.Tensor | None, what: str):
    if value is None:
        return
    value = value.reshape(param.shape) if value.numel() == param.numel() else value
    if value.shape != param.shape:
        raise RuntimeError(f"{what}: cannot write shape {tuple(value.shape)} into {tuple(param.shape)}")
    param.copy_(value.to(param.dtype))


def _write_linear(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, what: str, conv1d=False):
    flat = weight.reshape(-1, weight.shape[-1])
    _copy(linear.weight, flat.t() if conv1d else flat, what)
    if getattr(linear, "bias", None) is not None:
        _copy(linear.bias, bias if bias is not None else torch.zeros(linear.bias.shape), what + ".bias")


def write_attention(module: nn.Module, spec: AttentionSpec, w: AttentionWeights, patched: bool = False) -> None:
    """Write canonical weights into an attention block of the target model.

    ``patched=True`` means the block is hf_llmopt's patched attention, which always stores separate
    ``q_proj`` / ``k_proj`` / ``v_proj`` linears and keeps the family's output projection.
    """
    o = getattr(module, spec.o)
    o_flat = w.o_weight.reshape(w.o_weight.shape[0], -1)
    _copy(o.weight, o_flat.t() if spec.o_conv1d else o_flat, spec.o)
    if getattr(o, "bias", None) is not None and w.o_bias is not None:
        _copy(o.bias, w.o_bias, spec.o + ".bias")
    if patched or spec.layout == "separate":
        names = ("q_proj", "k_proj", "v_proj") if patched else (spec.q, spec.k, spec.v)
        for name, weight, bias in zip(names, (w.q_weight, w.k_weight, w.v_weight), (w.q_bias, w.k_bias, w.v_bias)):
            _write_linear(getattr(module, name), weight, bias, name)
    elif spec.layout == "fused_concat":
        fused = getattr(module, spec.qkv)
        flat = [t.reshape(-1, t.shape[-1]) for t in (w.q_weight, w.k_weight, w.v_weight)]
        _copy(fused.weight, torch.cat(flat), spec.qkv)
        if getattr(fused, "bias", None) is not None:
            _copy(fused.bias, torch.cat([b.reshape(-1) for b in (w.q_bias, w.k_bias, w.v_bias)]), spec.qkv + ".bias")
    else:
        raise NotImplementedError(f"writing the {spec.layout!r} layout needs the patched attention")
    _write_kv_norm(module, spec, w.k_norm)


def _write_kv_norm(module: nn.Module, spec: AttentionSpec, k_norm: dict[str, torch.Tensor]) -> None:
    if not k_norm:
        return
    norm = getattr(module, spec.kv_norm)
    if spec.kv_norm_layout == "module_list":
        for name, value in k_norm.items():
            for h, sub in enumerate(norm.norms):
                _copy(getattr(sub, name), value[h], f"{spec.kv_norm}.norms.{h}.{name}")
        return
    params = dict(norm.named_parameters())
    for name, value in k_norm.items():
        _copy(params[name], value, f"{spec.kv_norm}.{name}")


def kv_norm_per_head(spec: AttentionSpec, k_norm: dict[str, torch.Tensor], num_kv_heads: int, head_dim: int):
    """View per-head norm parameters as (KV, ...) so they can be merged or repeated like projections."""
    if spec.kv_norm_layout == "flat":
        return {k: v.reshape(num_kv_heads, head_dim) for k, v in k_norm.items()}
    return dict(k_norm)
