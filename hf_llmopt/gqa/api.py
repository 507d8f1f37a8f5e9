"""The GQA main job: load a model, convert it, measure it, write a Hub-ready checkpoint with its model card.

Used by ``hf-llmopt convert-gqa`` and ``examples/convert_gqa.py``.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._compat import kv_cache_bytes, library_versions
from ..architectures import get_arch_spec
from ..checkpoint import check_output_dir, markdown_table, save_converted
from ..data import token_blocks
from ..evaluation import perplexity
from ..models import DEFAULT_MODEL, load_causal_lm
from .config import GQAConfig
from .convert import CONFIG_RECORD_KEY, convert_to_gqa, num_heads_of

logger = logging.getLogger(__name__)

METHOD_DESCRIPTIONS = {
    "mean": "Mean pooling (Ainslie et al. 2023): each new K/V projection is the mean of the K/V projections "
            "(weights and biases) of the heads in its group of query heads. No data is used.",
    "repeat": "Expansion: each existing K/V head is repeated so that more query groups read it. This is exact.",
    "data_aware": "Data-aware closed form from second-moment statistics of calibration text. Values: the shared "
                  "value projection is the reduced-rank fit of all heads' value outputs as the output projection "
                  "sees them, and each head's output-projection slice is refit by weighted least squares. Keys: per "
                  "RoPE frequency pair, a complex rank-1 fit of the group's keys (weighted by query energy) is the "
                  "shared key, and each head's complex scalar is folded into its query projection. Least squares "
                  "shrinks the logits, so every attention logit is then multiplied by one factor, searched by the "
                  "KL from the original model's next-token distributions on the calibration text.",
    "data_aware_values": "The data-aware value fit (see `data_aware`) with mean-pooled keys.",
}


@dataclass
class ConvertGQAArguments:
    """What the convert-gqa job reads and writes (the conversion itself is configured by :class:`GQAConfig`)."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "'default' (SmolLM2-135M-Instruct, offline), a "
                                                                "local checkpoint folder, or a Hub id."})
    output_dir: str = field(default="outputs/gqa", metadata={"help": "Where the converted checkpoint is written."})
    calibration_data: str | None = field(default=None, metadata={
        "help": "Calibration data for data-aware methods: a json/jsonl/txt file or a datasets name. "
                "Default: text sampled from the model itself."})
    eval_data: str | None = field(default=None, metadata={
        "help": "Held-out evaluation data (same forms). Default: text sampled from the original model with a "
                "different seed than calibration."})
    eval_tokens: int = field(default=4096, metadata={"help": "Held-out tokens to evaluate perplexity on."})
    eval_seq_len: int = field(default=256, metadata={"help": "Evaluation sequence length."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def _kv_bytes_per_token(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(input_ids=blocks[:1], use_cache=True)
    cache = out.get("cache", None) or out.get("past_key_values", None)
    return kv_cache_bytes(cache) / blocks.shape[1]


def convert_and_save(args: ConvertGQAArguments, gqa: GQAConfig) -> dict:
    """Run the whole job and return what it measured (also written to the checkpoint's ``hf_llmopt.json``)."""
    check_output_dir(args.output_dir, args.overwrite)
    model, tokenizer = load_causal_lm(args.model)
    spec = get_arch_spec(model)
    heads, kv = num_heads_of(model.config, spec)

    eval_source = args.eval_data
    eval_blocks = token_blocks(eval_source, tokenizer, model=model, num_tokens=args.eval_tokens,
                               seq_len=args.eval_seq_len, seed=gqa.seed + 1)
    pad = tokenizer.pad_token_id if eval_source is None else None  # self-sampled blocks are padded after EOS
    start = time.perf_counter()
    converted = convert_to_gqa(model, tokenizer=tokenizer, calibration_data=args.calibration_data, **asdict(gqa))
    seconds = time.perf_counter() - start
    record = dict(getattr(converted.config, CONFIG_RECORD_KEY))

    ppl_before = perplexity(model, eval_blocks, pad_token_id=pad)
    ppl_after = perplexity(converted, eval_blocks, pad_token_id=pad)
    kv_before = _kv_bytes_per_token(model, eval_blocks)
    kv_after = _kv_bytes_per_token(converted, eval_blocks)
    eval_name = args.eval_data or f"{eval_blocks.numel():,} tokens sampled from the original model (seed {gqa.seed + 1})"
    results = {
        "model": args.model, "source_model": record.get("source_model"), "method": record["method"],
        "num_attention_heads": heads, "source_num_key_value_heads": kv,
        "num_key_value_heads": gqa.num_key_value_heads, "conversion_seconds": round(seconds, 2),
        "eval_data": eval_name, "eval_tokens": int(eval_blocks.numel()),
        "perplexity_original": ppl_before, "perplexity_converted": ppl_after,
        "perplexity_ratio": ppl_after / ppl_before,
        "kv_cache_bytes_per_token_original": kv_before, "kv_cache_bytes_per_token_converted": kv_after,
    }
    rows = [{"model": "original", "KV heads": kv, "perplexity": ppl_before, "KV bytes/token": kv_before},
            {"model": f"converted ({record['method']})", "KV heads": gqa.num_key_value_heads,
             "perplexity": ppl_after, "KV bytes/token": kv_after}]
    native = spec.attention.native
    context = {
        "base_model": record.get("source_model") or args.model,
        "model_name": Path(args.output_dir).name,
        "attention_kind": "mqa" if gqa.num_key_value_heads == 1 else "gqa",
        "source_kv_heads": kv, "num_key_value_heads": gqa.num_key_value_heads,
        "kv_fraction": f"{kv_after / kv_before:.3g}x",
        "kv_bytes_per_token_before": f"{kv_before:,.0f}", "kv_bytes_per_token_after": f"{kv_after:,.0f}",
        "dtype": str(next(converted.parameters()).dtype).replace("torch.", ""),
        "method": record["method"],
        "loading": ("Loads with plain `AutoModelForCausalLM.from_pretrained` (hf_llmopt is not needed)." if native
                    else "Its family cannot express fewer KV heads natively: `import hf_llmopt` first, then "
                         "`AutoModelForCausalLM.from_pretrained` rebuilds the patched attention."),
        "method_description": METHOD_DESCRIPTIONS.get(record["method"], record["method"]) + (
            f" Logit scale applied: {record['logit_scale']:g}." if "logit_scale" in record else ""),
        "conversion_seconds": f"{seconds:.1f}",
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "results_table": markdown_table(rows) + f"\n\nEvaluation data: {eval_name}.",
        "notes": "No training after conversion" + (" (layer-wise calibration only)." if gqa.layerwise_calibration
                                                   else "."),
        "versions": ", ".join(f"{k} {v}" for k, v in library_versions().items()),
    }
    save_converted(converted, tokenizer, args.output_dir, card_template="gqa.md", card_context=context,
                   record={"conversion": record, "results": results}, overwrite=args.overwrite)
    results["output_dir"] = str(args.output_dir)
    return results
