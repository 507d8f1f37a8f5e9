"""Layer-wise calibration: fit each converted attention block to reproduce the original block.

After a conversion, every attention block of the converted model is trained on its own (Adam on its q/k/v/o
projections only, no end-to-end backward) to reproduce the ORIGINAL block's outputs, fed either the original
model's hidden states or the converted model's own (then also to cancel the drift between the two). One forward
pass of the original model records every decoder layer's call arguments; the layers are then replayed one at a
time, and each block is called through its own ``forward`` with the recorded ``position_embeddings`` and
``attention_mask``, so whatever the family does inside attention (RoPE variants, norms, soft-capping, ALiBi) is
respected.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures import ArchSpec
from ..evaluation import eval_mode
from .convert import get_attention, get_decoder_layers
from .statistics import _ResidualScale, _StopForward, calibration_blocks, forward_batches

logger = logging.getLogger(__name__)

# Keyword arguments of an attention call that must not be replayed: caches are per call, and the replay wants
# neither a cache nor the attention probabilities.
_RESET_KWARGS = {"cache": None, "past_key_values": None, "layer_past": None, "use_cache": False,
                 "output_attentions": False}
# Captured activations are kept in fp32 up to this size and in bf16 beyond it.
FP32_CAPTURE_BYTES = 1 << 30
CAPTURE_BATCH_SIZE = 4


@dataclass
class _LayerData:
    inputs: list = field(default_factory=list)  # hidden_states per batch
    targets: list = field(default_factory=list)  # original block output per batch
    # (B, T, 1) per-position loss weight per batch: 1 / residual-stream energy (statistics.TOKEN_WEIGHTING), since the
    # next norm divides the block output by the residual's RMS (SmolLM2's first token: RMS ~1000 against ~6)
    weights: list = field(default_factory=list)
    calls: list = field(default_factory=list)  # (extra positional args, kwargs) per batch


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool, tuple, dict]:
    """A hooked call's ``(hidden_states, passed by name, other positional args detached, kwargs to replay)``."""
    by_name = "hidden_states" in kwargs
    hidden, rest = (kwargs["hidden_states"], args) if by_name else (args[0], args[1:])
    kwargs = {k: _RESET_KWARGS.get(k, v) for k, v in kwargs.items() if k != "hidden_states"}
    return hidden, by_name, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in rest), kwargs


class _CaptureHook:
    def __init__(self, layer: nn.Module, data: _LayerData, dtype: torch.dtype, last: bool):
        self.data, self.dtype, self.last = data, dtype, last
        self.scale = _ResidualScale(layer)
        self.handle = self.scale.handle

    def __call__(self, module, args, kwargs, output):
        hidden, _, rest, kwargs = _split_call(args, kwargs)
        out = output[0] if isinstance(output, tuple) else output
        self.data.inputs.append(hidden.detach().to(self.dtype))
        self.data.targets.append(out.detach().to(self.dtype))
        self.data.weights.append(self.scale.weights(out.new_ones(out.shape[:-1], dtype=torch.float32), out)[..., None])
        self.data.calls.append((rest, kwargs))
        if self.last:
            raise _StopForward


@torch.no_grad()
def capture_block_io(model, spec: ArchSpec, blocks: torch.Tensor, batch_size: int = CAPTURE_BATCH_SIZE):
    """Inputs, outputs and call arguments of every attention block of ``model`` over ``blocks``."""
    layers = get_decoder_layers(model, spec)
    hidden = model.config.get_text_config().hidden_size
    size = blocks.numel() * hidden * len(layers) * 2 * 4
    dtype = torch.float32 if size <= FP32_CAPTURE_BYTES else torch.bfloat16
    data = [_LayerData() for _ in layers]
    hooks = [_CaptureHook(layer, d, dtype, i == len(layers) - 1) for i, (layer, d) in enumerate(zip(layers, data))]
    handles = [get_attention(layer, spec).register_forward_hook(hook, with_kwargs=True)
               for layer, hook in zip(layers, hooks)] + [hook.handle for hook in hooks]
    forward_batches(model, blocks, batch_size, handles)
    return data


def trainable_parameters(attention: nn.Module, spec: ArchSpec) -> list[nn.Parameter]:
    """The q/k/v/o projection parameters of one attention block (fused or separate, patched or native)."""
    names = spec.attention.projection_names
    if getattr(attention, "hf_llmopt_patched", False):
        names = ("q_proj", "k_proj", "v_proj", spec.attention.o)
    params = []
    for name in names:
        params.extend(getattr(attention, name).parameters())
    return params


def _block_output(attention: nn.Module, data: _LayerData, i: int) -> torch.Tensor:
    rest, kwargs = data.calls[i]
    dtype = next(attention.parameters()).dtype
    out = attention(data.inputs[i].to(dtype), *rest, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _weighted_error(out: torch.Tensor, data: _LayerData, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum w ||f(x) - y||^2, sum w ||y||^2)`` of batch ``i``."""
    target = data.targets[i].float()
    weight = data.weights[i]
    return (weight * (out.float() - target).pow(2)).sum(), (weight * target.pow(2)).sum()


@torch.no_grad()
def block_relative_mse(attention: nn.Module, data: _LayerData) -> float:
    """``sum w ||f(x) - y||^2 / sum w ||y||^2`` over all captured batches of one block (``w``: position weights)."""
    err, norm = 0.0, 0.0
    for i in range(len(data.inputs)):
        e, n = _weighted_error(_block_output(attention, data, i), data, i)
        err, norm = err + float(e), norm + float(n)
    return err / max(norm, 1e-30)


def fit_block(attention: nn.Module, params: list[nn.Parameter], data: _LayerData, seconds: float, lr: float) -> int:
    """Adam on ``params`` for ``seconds`` of wall time, cosine-decayed learning rate; returns the step count."""
    scales = [float(_weighted_error(t, data, i)[1]) for i, t in enumerate(data.targets)]  # per-batch target energy
    optimizer = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    steps = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return steps
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * elapsed / seconds))
        i = steps % len(data.inputs)
        loss = _weighted_error(_block_output(attention, data, i), data, i)[0] / max(scales[i], 1e-30)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1


def _head_dim(model, spec: ArchSpec) -> int:
    attention = get_attention(get_decoder_layers(model, spec)[0], spec)
    config = model.config.get_text_config()
    return int(getattr(attention, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class _LayerCalls:
    """Forward pre-hook on a decoder layer: its call arguments per batch (and, for the first layer, its input)."""

    def __init__(self, keep_input: bool, last: bool):
        self.calls, self.inputs, self.keep_input, self.last = [], [], keep_input, last

    def __call__(self, module, args, kwargs):
        hidden, by_name, rest, kwargs = _split_call(args, kwargs)
        self.calls.append((by_name, rest, kwargs))
        if self.keep_input:
            self.inputs.append(hidden.detach().float())
        if self.last:
            raise _StopForward


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    by_name, rest, kwargs = call
    dtype = next(layer.parameters()).dtype
    out = layer(*rest, hidden_states=hidden.to(dtype), **kwargs) if by_name else layer(hidden.to(dtype), *rest,
                                                                                      **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


class _InputHook:
    """Forward pre-hook on an attention block: keeps its ``hidden_states`` and stops the layer there."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, module, args, kwargs):
        self.store.append(_split_call(args, kwargs)[0].detach().float())
        raise _StopForward


@torch.no_grad()
def _layer_data(original_layer, converted_layer, spec: ArchSpec, teacher: list, student: list,
                calls: list, drift: float = 0.0) -> tuple[_LayerData, list]:
    """One layer's fitting data: the original block's outputs on ``teacher``, its attention inputs from ``student``.

    With ``drift`` the targets also hold that fraction of ``teacher - student`` (the residual stream's drift at the
    layer's input): a block whose output meets them puts the converted residual stream back on the original one.

    Returns the data and the original layer's outputs (the next layer's teacher inputs).
    """
    data = _LayerData()
    hook = _CaptureHook(original_layer, data, torch.float32, last=False)
    handles = [get_attention(original_layer, spec).register_forward_hook(hook, with_kwargs=True), hook.handle]
    try:
        outputs = [_run_layer(original_layer, h, call) for h, call in zip(teacher, calls)]
    finally:
        for handle in handles:
            handle.remove()
    if student is not teacher:
        inputs = []
        handle = get_attention(converted_layer, spec).register_forward_pre_hook(_InputHook(inputs), with_kwargs=True)
        try:
            for h, call in zip(student, calls):
                try:
                    _run_layer(converted_layer, h, call)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        data.inputs = inputs
        if drift:
            data.targets = [y + drift * (t - s).to(y.dtype) for y, t, s in zip(data.targets, teacher, student)]
    return data, outputs


def layerwise_calibrate(original, converted, spec: ArchSpec, cfg, calibration_data=None, tokenizer=None,
                        reserve_seconds: float = 0.0) -> dict:
    """Fit every attention block of ``converted``, first to last, to the matching block of ``original``.

    The layers are processed first to last, keeping only the current layer's hidden states (``tokens x hidden``,
    two copies at most), whatever the depth. Every block is fitted to reproduce what the original block outputs on
    the original model's hidden states. With ``cfg.layerwise_inputs="original"`` it is fed those same hidden states
    (every block fitted independently); with ``"converted"`` it is fed the converted model's own hidden states
    (layers ``< l`` already calibrated), and its target is the original block's output plus
    ``cfg.layerwise_drift`` times the drift between the two models' hidden states at its input, so each block also
    pulls the converted residual stream back towards the original one.

    Each block gets an equal share of what is left of ``cfg.layerwise_minutes`` (the forward passes count against
    the budget too). A block whose error did not go down keeps its closed-form weights. Self-sampled calibration
    text comes packed without padding (:func:`~hf_llmopt.gqa.statistics.calibration_blocks`).

    Args:
        original: the source model (not modified).
        converted: the converted model, modified in place.
        spec: the family's architecture entry.
        cfg: a :class:`~hf_llmopt.gqa.config.GQAConfig` (``layerwise_minutes``, ``layerwise_lr``,
            ``layerwise_inputs``, calibration).
        calibration_data, tokenizer: as for :func:`~hf_llmopt.gqa.convert.convert_to_gqa`.
        reserve_seconds: left out of the budget for what runs after the stage (the logit-scale search).

    Returns:
        Statistics for the conversion record: per-layer relative MSE before/after, steps, seconds.
    """
    start = time.perf_counter()
    deadline = start + 60.0 * cfg.layerwise_minutes - reserve_seconds
    blocks = calibration_blocks(original, calibration_data, tokenizer, cfg, _head_dim(original, spec))
    originals, layers = get_decoder_layers(original, spec), get_decoder_layers(converted, spec)
    recorders = [_LayerCalls(keep_input=i == 0, last=i == len(originals) - 1) for i in range(len(originals))]
    handles = [layer.register_forward_pre_hook(r, with_kwargs=True) for layer, r in zip(originals, recorders)]
    with torch.no_grad():
        forward_batches(original, blocks, cfg.layerwise_batch_size, handles)  # one Adam step per batch
    teacher = recorders[0].inputs
    sequential = cfg.layerwise_inputs == "converted"
    drift = cfg.layerwise_drift if sequential else 0.0  # with original inputs there is none
    student = [h.clone() for h in teacher] if sequential else teacher
    flags = {p: p.requires_grad for p in converted.parameters()}
    per_layer = []
    with eval_mode(converted, original):  # no dropout: the fit targets the deterministic block
        try:
            for p in converted.parameters():
                p.requires_grad_(False)
            for index, (original_layer, layer) in enumerate(zip(originals, layers)):
                calls = recorders[index].calls
                pass_start = time.perf_counter()
                layer_data, next_teacher = _layer_data(original_layer, layer, spec, teacher, student, calls, drift)
                pass_seconds = time.perf_counter() - pass_start
                attention = get_attention(layer, spec)
                params = trainable_parameters(attention, spec)
                backup = [p.detach().clone() for p in params]
                for p in params:
                    p.requires_grad_(True)
                before = block_relative_mse(attention, layer_data)
                # the forward passes of the layers still to come (about 1.5x this one's: one more to advance) are
                # reserved before the rest is shared
                reserve = 1.5 * pass_seconds * (len(layers) - index - 1)
                share = max(0.0, deadline - time.perf_counter() - reserve) / (len(layers) - index)
                steps = fit_block(attention, params, layer_data, share, cfg.layerwise_lr) if share > 0 else 0
                after = block_relative_mse(attention, layer_data)
                if not after < before:  # keep the closed form when the fit did not help (or diverged)
                    with torch.no_grad():
                        for p, b in zip(params, backup):
                            p.copy_(b)
                    after = before
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
                per_layer.append({"layer": index, "initial_mse": before, "final_mse": after, "steps": steps})
                logger.info("layer-wise calibration, layer %d: relative MSE %.4g -> %.4g in %d steps", index, before,
                            after, steps)
                if index + 1 < len(layers):
                    with torch.no_grad():
                        student = ([_run_layer(layer, h, call) for h, call in zip(student, calls)]
                                   if sequential else next_teacher)
                teacher = next_teacher
                del layer_data
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
    return {
        "layerwise_calibration": True,
        "layerwise_seconds": round(time.perf_counter() - start, 2),
        "layerwise_steps": sum(r["steps"] for r in per_layer),
        "layerwise_tokens": int(blocks.numel()),
        "layerwise_lr": cfg.layerwise_lr,
        "layerwise_inputs": cfg.layerwise_inputs,
        "layerwise_drift": drift,
        "layerwise_layers": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                             for r in per_layer],
    }
