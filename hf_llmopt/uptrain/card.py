"""The model card of an uptrained checkpoint (``model_cards/uptrain.md``): recipe, budget, before/after numbers."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from .._compat import library_versions
from ..architectures import get_arch_spec
from ..checkpoint import markdown_table

OBJECTIVE_DESCRIPTIONS = {
    "layerwise": "a layer-wise stage before end-to-end training: each converted attention block trained alone "
                 "(Adam, {minutes} min) to reproduce the teacher's block output on calibration inputs",
    "next_token": "next-token cross-entropy",
    "distill": "distillation from the teacher (KL of the next-token distributions at temperature {temperature})",
}
TRAINABLE_DESCRIPTIONS = {
    "all": "all weights",
    "attention": "the attention blocks only (every other weight frozen)",
    "lora": "LoRA adapters (r={r}, alpha={alpha}) on {targets}, merged into the weights at the end (merged logits "
            "equal the unmerged ones within {merge})",
}


def _objective(config, metrics, converted: bool) -> str:
    parts = ["attention scales rebalanced first (query/key and value/output pairs: the function is unchanged)"] if (
        config.balance_scales and converted) else []
    parts += [OBJECTIVE_DESCRIPTIONS[t].format(minutes=config.layerwise_minutes, temperature=config.distill_temperature)
             for t in config.objective_terms]
    if len(config.end_to_end_terms) == 2:
        parts.append(f"end-to-end loss = {1 - config.distill_weight:g} x next-token + {config.distill_weight:g} x "
                     "distillation")
    if "layerwise_error_before" in metrics:
        parts.append(f"layer-wise relative attention-output error {metrics['layerwise_error_before']:.4f} -> "
                     f"{metrics['layerwise_error_after']:.4f}")
    return "; ".join(parts) + "."


def _row(name: str, metrics: dict, suffix: str) -> dict | None:
    if f"perplexity_{suffix}" not in metrics:
        return None
    kl = metrics.get(f"kl_{suffix}")
    return {"model": name, "perplexity": metrics[f"perplexity_{suffix}"],
            "KL to teacher": kl if kl is not None else "-"}


def _budget(config, metrics: dict, num_processes: int) -> str:
    hardware = (f"{platform.machine()} CPU, {num_processes} process(es) x {torch.get_num_threads()} threads"
                if not torch.cuda.is_available() else f"{num_processes} x {torch.cuda.get_device_name()}")
    schedule = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
    lines = [f"- Hardware: {hardware}"]
    if config.end_to_end_terms:
        lines += [
            f"- End-to-end training: {metrics.get('steps', 0)} optimizer steps, "
            f"{metrics.get('tokens_seen', 0):,} tokens seen, {metrics.get('train_minutes', 0.0):.2f} minutes of "
            f"training (held-out evaluation excluded: {metrics.get('eval_minutes', 0.0):.2f} minutes)",
            f"- Batch: {config.per_device_train_batch_size} x {config.seq_len} tokens per process, gradient "
            f"accumulation {config.gradient_accumulation_steps}; AdamW, learning rate {config.learning_rate:g} "
            f"({schedule})",
        ]
        if config.max_minutes is not None:
            lines.append(f"- Time budget: {config.max_minutes:g} minutes of training")
    if "layerwise_seconds" in metrics:
        lines.append(f"- Layer-wise stage: {metrics['layerwise_seconds']:.0f} s, {metrics['layerwise_steps']} "
                     "attention-block steps")
    return "\n".join(lines)


def card_context(config, model, teacher, record: dict | None, metrics: dict, data, num_processes: int,
                 source_name: str | None = None, curves: str | None = None) -> dict:
    """Values for ``model_cards/uptrain.md`` (``source_name``: what the input model is called)."""
    spec = get_arch_spec(model)
    teacher_name = (getattr(teacher.config, "_name_or_path", None) or config.teacher or "the input model"
                    ) if teacher is not None else "none"
    base = (record or {}).get("source_model") or source_name or "unknown"
    if record:
        kv, g = record.get("source_num_key_value_heads"), record.get("num_key_value_heads")
        conversion = f"with its attention converted from {kv} to {g} key/value heads (`convert_to_gqa`, method " \
                     f"`{record.get('method')}`)"
        kind = "mqa" if g == 1 else "gqa"
    else:
        conversion = "not converted"
        kind = "fine-tuned"
    targets = ""
    if config.trainable == "lora":
        targets = ", ".join(config.lora_target_modules or ["every projection in the architecture table"])
    merge = metrics.get("lora_merge_max_relative_difference")
    rows = [r for r in (_row("teacher (original)", metrics, "teacher"), _row("converted (before training)", metrics,
                                                                             "init"),
                        _row("after the layer-wise stage", metrics, "layerwise"),
                        _row("uptrained (this checkpoint)", metrics, "after")) if r]
    return {
        "base_model": base,
        "model_name": Path(config.output_dir).name,
        "attention_kind": kind,
        "conversion": conversion,
        "loading": ("Loads with plain `AutoModelForCausalLM.from_pretrained` (hf_llmopt is not needed)."
                    if spec.attention.native or not record else
                    "Its family cannot express fewer KV heads natively: `import hf_llmopt` first, then "
                    "`AutoModelForCausalLM.from_pretrained` rebuilds the patched attention."),
        "objective_description": _objective(config, metrics, bool(record)),
        "trainable_description": TRAINABLE_DESCRIPTIONS[config.trainable].format(
            r=config.lora_r, alpha=config.lora_alpha, targets=targets,
            merge=f"{merge:.1e}" if merge is not None else "-"),
        "data_description": data.train_description,
        "budget": _budget(config, metrics, num_processes),
        "results_table": markdown_table(rows) if rows else "_not measured_",
        "eval_description": data.eval_description,
        "curves": f"![loss and held-out perplexity against steps and minutes]({curves})" if curves else "",
        "teacher": teacher_name,
        "versions": ", ".join(f"{k} {v}" for k, v in library_versions().items()),
    }
