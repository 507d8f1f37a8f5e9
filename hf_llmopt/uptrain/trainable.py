"""What is trained: all weights, only the attention blocks, or LoRA adapters merged at the end.

Module names come from the architecture table (:func:`~hf_llmopt.get_arch_spec`); attention projections are found
under each decoder layer's attention block, so families converted into hf_llmopt's patched attention (whose
projections are ``q_proj``/``k_proj``/``v_proj`` whatever the original stored) are covered too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures import ArchSpec, get_arch_spec
from ..gqa.convert import get_attention, get_decoder_layers
from .config import LORA_TARGET_PRESETS

# Largest |merged - unmerged| logit difference accepted, relative to the largest |logit|: fp32 rounding only, which
# grows with depth (tiny 2-layer models stay under 1e-5; the 30-layer SmolLM2 after 15 minutes of LoRA at lr 1e-3
# measured 2.2e-5).
MERGE_TOLERANCE = 1e-4


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def attention_module_names(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Full names of the linear projections inside every decoder layer's attention block."""
    names = []
    for i, layer in enumerate(get_decoder_layers(model, spec)):
        prefix = f"{spec.layers}.{i}.{spec.attention.module}"
        for name, module in get_attention(layer, spec).named_modules():
            if name and _is_linear(module):
                names.append(f"{prefix}.{name}")
    return names


def resolve_lora_targets(model: nn.Module, targets: list[str] | None = None,
                         arch_spec: ArchSpec | None = None) -> list[str]:
    """LoRA target modules: the user's names win; ``"all"`` (default) or ``"attention"`` come from the table.

    ``"all"`` is the table's ``lora_target_modules`` (every attention and MLP projection), with the attention part
    read from the model so that a patched conversion's ``q_proj``/``k_proj``/``v_proj`` are found. ``"attention"``
    gives the full names of the attention projections only (a name such as GPT-2's ``c_proj`` also exists in its
    MLP).
    """
    if targets and not (len(targets) == 1 and targets[0] in LORA_TARGET_PRESETS):
        return list(targets)
    preset = targets[0] if targets else "all"
    spec = get_arch_spec(model, arch_spec)
    attention = attention_module_names(model, spec)
    if not attention:
        raise ValueError(f"found no linear projections under {spec.layers}.*.{spec.attention.module}; pass "
                         "lora_target_modules explicitly")
    if preset == "attention":
        return attention
    leaves = {name.rsplit(".", 1)[-1] for name in attention}
    return sorted(leaves | set(spec.mlp.projection_names))


def select_trainable(model: nn.Module, trainable: str, arch_spec: ArchSpec | None = None) -> int:
    """Freeze what ``trainable`` (``"all"`` or ``"attention"``) excludes; return the number of trainable values."""
    if trainable == "all":
        model.requires_grad_(True)
    elif trainable == "attention":
        spec = get_arch_spec(model, arch_spec)
        model.requires_grad_(False)
        for layer in get_decoder_layers(model, spec):
            get_attention(layer, spec).requires_grad_(True)
    else:
        raise ValueError(f"select_trainable handles 'all' and 'attention', got {trainable!r} (LoRA: add_lora)")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
             target_modules: list[str] | None = None, arch_spec: ArchSpec | None = None):
    """Wrap ``model`` in a PEFT LoRA model (base weights frozen). Returns the ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_lora_targets(model, target_modules, arch_spec)
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules()
                         if n.rsplit(".", 1)[-1] in targets or n in targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)
    return get_peft_model(model, config)


@torch.no_grad()
def merge_lora(peft_model, check_ids: torch.Tensor, tolerance: float = MERGE_TOLERANCE):
    """``merge_and_unload`` the adapters, checking that the merged model's logits equal the unmerged ones.

    Returns:
        ``(merged_model, max_relative_difference)``.

    Raises:
        RuntimeError: the merged model differs by more than ``tolerance`` (relative to the largest logit).
    """
    peft_model.eval()
    device = next(peft_model.parameters()).device
    unmerged = peft_model(input_ids=check_ids.to(device)).logits.float()
    merged_model = peft_model.merge_and_unload()
    merged = merged_model(input_ids=check_ids.to(device)).logits.float()
    difference = float((merged - unmerged).abs().max() / unmerged.abs().max().clamp(min=1.0))
    if difference > tolerance:
        raise RuntimeError(f"merged LoRA model differs from the unmerged one by {difference:.2e} (relative), more "
                           f"than {tolerance:.0e}")
    return merged_model, difference
