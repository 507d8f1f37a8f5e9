"""Held-out perplexity of the real model converted 3 -> 1 KV heads (MQA), per conversion method.

Held-out chat text: the last ``--held-out-rows`` rows of GSM8K train, chat-formatted (calibration never sees them: by
default it samples its own text from the model; ``--calibration gsm8k`` takes the GSM8K rows before them, ``mixed``
both). Prose: ``benchmarks/data/prose.txt`` (original English prose written for this benchmark: 3,547 tokens, so
13 sequences of 256 are scored); ``--prose prose.txt,prose_more.txt`` adds more of it, written later, to fill the
8,192 tokens the chat text has (32 sequences of 256; the README's earlier figures are on prose.txt alone). Long context
(``--long-seq-len``, 0 skips it): the same held-out chat rows packed one after another into 2,048-token sequences,
where most of what the model can exploit is earlier text in the same sequence (every row repeats the chat template's
system prompt and the GSM8K answer format), so it shows what the conversion costs at long range.
``--long-prose`` adds the prose in sequences of that length (4 of 2,048 with both prose files, 1 with prose.txt).
Every ratio to the original comes with a 95% paired bootstrap interval over the evaluation sequences (how much it
depends on which text was scored; the calibration draw moves it too, and is not in it). Prints a table and writes
``benchmarks/results/gqa_quality.json`` (or ``--out``). At the current defaults:

    python benchmarks/gqa_quality.py --layerwise-minutes 10 --threads 2
    python benchmarks/gqa_quality.py --layerwise-minutes 10 --threads 2 --methods data_aware --calibration gsm8k \
        --out benchmarks/results/gqa_quality_gsm8k_calibration.json

The stage as it was before the drift target (``gqa_quality_batch2.json``, ``gqa_quality_batch4.json``):

    python benchmarks/gqa_quality.py --methods "" --layerwise-minutes 10 --threads 2 --layerwise-drift 0 \
        --layerwise-lr 3e-4 --layerwise-inputs converted,original --layerwise-batch-size 2 \
        --out benchmarks/results/gqa_quality_batch2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hf_llmopt import convert_to_gqa, load_default_model
from hf_llmopt._compat import library_versions
from hf_llmopt.gqa.config import GQAConfig
from hf_llmopt.gqa.convert import CONFIG_RECORD_KEY
from hf_llmopt.data import load_records, pack_samples, pack_token_blocks, sampling_pad_token_id, token_blocks
from hf_llmopt.evaluation import perplexity_of, perplexity_ratio_interval, sequence_nll

HERE = Path(__file__).resolve().parent
GSM8K = HERE.parent.parent / "shared" / "data" / "gsm8k_train.jsonl"
PROSE = HERE / "data" / "prose.txt"
PROSE_SOURCE = "original English prose written for this benchmark"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gsm8k", default=str(GSM8K))
    p.add_argument("--held-out-rows", type=int, default=500)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--prose", default=PROSE.name,
                   help="comma-separated files in benchmarks/data/ joined into the prose evaluation text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--long-seq-len", type=int, default=2048,
                   help="also evaluate the held-out chat rows packed into sequences of this length (0 skips it)")
    p.add_argument("--long-eval-tokens", type=int, default=16384)
    p.add_argument("--long-prose", action="store_true",
                   help="also evaluate the prose (--prose) in --long-seq-len sequences")
    p.add_argument("--num-key-value-heads", type=int, default=1)
    p.add_argument("--methods", default="mean,data_aware_values,data_aware",
                   help="comma-separated conversion methods; data_aware+layerwise is added by --layerwise-minutes")
    p.add_argument("--layerwise-minutes", type=float, default=5.0, help="0 skips the layer-wise run")
    p.add_argument("--layerwise-lr", type=float, default=GQAConfig.layerwise_lr)
    p.add_argument("--layerwise-batch-size", type=int, default=GQAConfig.layerwise_batch_size)
    p.add_argument("--layerwise-drift", type=float, default=GQAConfig.layerwise_drift)
    p.add_argument("--layerwise-inputs", default=GQAConfig.layerwise_inputs,
                   help="comma-separated: one layer-wise run per value of GQAConfig.layerwise_inputs")
    p.add_argument("--calibration", choices=("self", "gsm8k", "mixed"), default="self",
                   help="calibration text of the data-aware methods: 'self' (the default of convert_to_gqa: text "
                   "sampled from the model), 'gsm8k' (GSM8K train rows before the held-out ones: in-domain) or "
                   "'mixed' (--calibration-tokens of each, concatenated)")
    p.add_argument("--calibration-tokens", type=int, default=12288)
    p.add_argument("--calibration-seq-len", type=int, default=GQAConfig.calibration_seq_len,
                   help="length of the self-sampled calibration sequences (GSM8K calibration uses --seq-len)")
    p.add_argument("--logit-scale", default=GQAConfig.logit_scale,
                   help="GQAConfig.logit_scale of the data_aware runs: 'auto', 'off' or a number")
    p.add_argument("--static-rope-angle", type=float, default=GQAConfig.static_rope_angle,
                   help="GQAConfig.static_rope_angle of the data-aware runs")
    p.add_argument("--static-key-fit", choices=["joint", "separate"], default=GQAConfig.static_key_fit,
                   help="GQAConfig.static_key_fit of the data-aware runs")
    p.add_argument("--seed", type=int, default=GQAConfig.seed,
                   help="GQAConfig.seed of the data-aware runs: which self-sampled calibration text they see")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "gqa_quality.json"))
    return p


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_default_model()
    chat_rows = load_records(args.gsm8k)[-args.held_out_rows:]
    prose = [(PROSE.parent / name).read_text(encoding="utf-8") for name in args.prose.split(",")]
    eval_sets = {
        "chat (GSM8K held-out)": token_blocks(chat_rows, tokenizer, num_tokens=args.eval_tokens, seq_len=args.seq_len),
        "prose": pack_token_blocks(prose, tokenizer, args.seq_len, args.eval_tokens),
    }
    if args.long_seq_len:
        eval_sets[f"chat packed {args.long_seq_len}"] = token_blocks(  # the rows one after another
            chat_rows, tokenizer, num_tokens=args.long_eval_tokens, seq_len=args.long_seq_len)
        if args.long_prose:
            eval_sets[f"prose {args.long_seq_len}"] = pack_token_blocks(
                prose, tokenizer, args.long_seq_len, args.long_eval_tokens)

    calibration, calibration_tokens = None, args.calibration_tokens
    if args.calibration in ("gsm8k", "mixed"):
        calibration = token_blocks(load_records(args.gsm8k)[:-args.held_out_rows], tokenizer,
                                   num_tokens=args.calibration_tokens, seq_len=args.seq_len)
    if args.calibration == "mixed":
        sampled = pack_samples(token_blocks(None, tokenizer, model=model, num_tokens=args.calibration_tokens,
                                            seq_len=args.seq_len, seed=args.seed),
                               sampling_pad_token_id(tokenizer))  # as the default
        calibration = torch.cat([sampled, calibration])
        calibration_tokens = int(calibration.numel())

    base_nll = {name: sequence_nll(model, blocks) for name, blocks in eval_sets.items()}

    def evaluate(m) -> dict:
        """Perplexity per evaluation set, and for a converted model its ratio to the original's with a paired
        bootstrap interval over the evaluation sequences (how much the ratio depends on which text was scored)."""
        out = {}
        for name, blocks in eval_sets.items():
            scores = base_nll[name] if m is model else sequence_nll(m, blocks)
            out[name] = perplexity_of(scores)
            if m is not model:
                out[f"{name} / original, 95% interval"] = perplexity_ratio_interval(base_nll[name], scores)
        return out

    rows = [{"method": "original", "num_key_value_heads": model.config.num_key_value_heads,
             "conversion_seconds": 0.0, **evaluate(model)}]
    runs = [(m, {}) for m in args.methods.split(",") if m]
    if args.layerwise_minutes > 0:
        runs += [("data_aware", {"layerwise_calibration": True, "layerwise_minutes": args.layerwise_minutes,
                                 "layerwise_lr": args.layerwise_lr, "layerwise_inputs": inputs,
                                 "layerwise_batch_size": args.layerwise_batch_size,
                                 "layerwise_drift": args.layerwise_drift})
                 for inputs in args.layerwise_inputs.split(",")]
    for method, extra in runs:
        start = time.perf_counter()
        if method != "mean":
            extra = {**extra, "calibration_data": calibration, "calibration_tokens": calibration_tokens,
                     "logit_scale": args.logit_scale, "static_rope_angle": args.static_rope_angle,
                     "static_key_fit": args.static_key_fit,
                     "calibration_seq_len": args.calibration_seq_len, "seed": args.seed}
        converted = convert_to_gqa(model, args.num_key_value_heads, method=method, tokenizer=tokenizer, **extra)
        seconds = time.perf_counter() - start
        name = method + (f" + layer-wise {args.layerwise_minutes:g} min ({extra['layerwise_inputs']} inputs)"
                         if "layerwise_calibration" in extra else "")
        record = getattr(converted.config, CONFIG_RECORD_KEY)
        rows.append({"method": name, "num_key_value_heads": args.num_key_value_heads,
                     "conversion_seconds": round(seconds, 1), **evaluate(converted),
                     **{k: record[k] for k in ("logit_scale", "logit_scale_searches", "layerwise_seconds",
                                               "layerwise_drift") if k in record}})
        print(json.dumps(rows[-1]), flush=True)
        del converted

    base = rows[0]
    for row in rows:
        for name in eval_sets:
            row[f"{name} / original"] = row[name] / base[name]
    result = {
        "settings": vars(args), "eval_tokens": {k: int(v.numel()) for k, v in eval_sets.items()},
        "prose_source": f"benchmarks/data/{{{args.prose}}}: {PROSE_SOURCE}",
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "library_versions": library_versions(), "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    names = list(eval_sets)
    print(f"\n| method | KV heads | {' | '.join(names)} | {' | '.join(n + ' / original' for n in names)} | seconds |")
    print("|---|---|" + "---|" * (2 * len(names) + 1))
    for r in rows:
        cells = [f"{r[n]:.2f}" for n in names] + [f"{r[n + ' / original']:.2f}x" + (
            " ({:.2f}x-{:.2f}x)".format(*r[n + " / original, 95% interval"]) if r is not base else "") for n in names]
        print(f"| {r['method']} | {r['num_key_value_heads']} | {' | '.join(cells)} | {r['conversion_seconds']} |")
    return result


if __name__ == "__main__":
    main()
