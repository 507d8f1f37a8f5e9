"""Decode throughput and KV-cache bytes of a model and its MQA/GQA conversion, on CPU.

Prefill is not measured: each model prefills ``--prefill-rows`` distinct rows of real text once (batch 1, last logit
only), and every timed run starts from a fresh copy of that cache tiled to ``--batch`` rows. Each run then takes
``--warmup-steps`` untimed and ``--new-tokens`` timed greedy steps, ``model(input_ids=next, cache=cache)`` one
token at a time. The two sides alternate step by step (``--alternate step``, so that both see the same load on a
shared CPU) or run by run, and which side goes first alternates between the ``--repeats`` runs; the table reports
median tokens/s per side and the ratio of the medians. Both sides use the same ``--threads``.

Configurations are every pair of ``--attn-implementation`` x ``--cache`` (comma-separated lists):
``dynamic`` is transformers' ``DynamicCache`` (``torch.cat`` per step, no mask at decode so sdpa takes its
``enable_gqa`` path); ``static`` is ``StaticCache`` preallocated to the final length (in-place writes, a padding
mask every step, so sdpa packs the query heads itself). ``gqa_packed`` is :mod:`hf_llmopt.gqa.attention`.
``eager`` expands K/V with ``repeat_kv`` every step. ``--profile-steps`` adds a per-component time breakdown of a
few extra alternated steps (forward hooks; not part of the medians).

Example:
    python benchmarks/gqa_decode.py --batch 16 --context 2048 --new-tokens 32 --repeats 3 --threads 1 \\
        --attn-implementation sdpa,gqa_packed --cache dynamic,static --out benchmarks/results/gqa_decode.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from hf_llmopt import convert_to_gqa, load_default_model
from hf_llmopt._compat import kv_cache_bytes, library_versions
from hf_llmopt.gqa.attention import register_gqa_attention

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_train.jsonl"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=2048, help="tokens in the cache before decoding starts")
    p.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps at the start of each run")
    p.add_argument("--repeats", type=int, default=3, help="alternated runs per side and configuration")
    p.add_argument("--alternate", choices=("step", "run"), default="step",
                   help="alternate the two sides step by step (fair under a shared CPU) or run by run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-key-value-heads", type=int, default=1, help="G of the converted model (1 = MQA)")
    p.add_argument("--attn-implementation", default="sdpa", help="comma-separated, e.g. sdpa,gqa_packed,eager")
    p.add_argument("--cache", default="dynamic", help="comma-separated subset of dynamic,static")
    p.add_argument("--prefill-rows", type=int, default=1, help="distinct context rows, tiled to --batch")
    p.add_argument("--tokens", choices=("text", "random"), default="text", help="GSM8K text, or random ids")
    p.add_argument("--profile-steps", type=int, default=4, help="0 disables the per-component breakdown")
    p.add_argument("--out", default="benchmarks/results/gqa_decode.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    return p


def context_ids(tokenizer, rows: int, length: int, source: str, seed: int = 0) -> torch.Tensor:
    """(rows, length) token ids: consecutive GSM8K problems (each row starts at a different one), or random ids."""
    gen = torch.Generator().manual_seed(seed)
    if source == "random" or not DATA.is_file():
        return torch.randint(100, tokenizer.vocab_size, (rows, length), generator=gen)
    lines = DATA.read_text().splitlines()
    out = []
    for r in range(rows):
        ids, i = [], r * 97
        while len(ids) < length:
            item = json.loads(lines[i % len(lines)])
            ids += tokenizer(item["question"] + "\n" + item["answer"] + "\n\n")["input_ids"]
            i += 1
        out.append(ids[:length])
    return torch.tensor(out)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per-layer (keys, values) of shape (rows, KV, S, d) and each row's greedy next token, one row at a time."""
    from transformers import DynamicCache

    per_row, firsts = [], []
    for row in ids:
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=row[None], cache=cache, use_cache=True, logits_to_keep=1).logits
        per_row.append([(layer.keys, layer.values) for layer in cache.layers])
        firsts.append(logits[0, -1].argmax())
    layers = [(torch.cat([r[i][0] for r in per_row]), torch.cat([r[i][1] for r in per_row]))
              for i in range(len(per_row[0]))]
    return layers, torch.stack(firsts)


def tile(t: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // t.shape[0])
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch].contiguous()


def build_cache(model, kv, kind: str, batch: int, max_len: int):
    """A fresh cache of ``kind`` holding ``kv`` tiled to ``batch`` rows (a copy: runs never share state)."""
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(kv):
            cache.update(tile(k, batch), tile(v, batch), i)
        return cache
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for layer, (k, v) in zip(cache.layers, kv):
        layer.lazy_initialization(tile(k[:, :, :1], batch), tile(v[:, :, :1], batch))
        layer.keys[:, :, : k.shape[2]] = tile(k, batch)
        layer.values[:, :, : v.shape[2]] = tile(v, batch)
        layer.cumulative_length.fill_(k.shape[2])
    return cache


@torch.inference_mode()
def decode_step(model, cache, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One greedy step on ``tokens`` (B, 1): (seconds, next tokens (B, 1))."""
    start = time.perf_counter()
    logits = model(input_ids=tokens, cache=cache, use_cache=True).logits
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start, nxt


def new_states(sides: dict, kind: str, batch: int, max_len: int) -> dict:
    """``name -> [model, fresh cache, first tokens (B, 1)]``; decode steps update the tokens in place."""
    return {name: [s["model"], build_cache(s["model"], s["kv"], kind, batch, max_len),
                   tile(s["first"], batch)[:, None]] for name, s in sides.items()}


def decode_alternated(states: dict, order: list[str], warmup: int, steps: int, alternate: str) -> dict:
    """Seconds of each timed step per side.

    ``alternate="step"`` runs one step of each side in turn, so both sides see the same machine load (the CPU is
    shared); ``"run"`` finishes all steps of one side before the other starts.
    """
    times = {name: [] for name in order}
    if alternate == "step":
        schedule = [(i, name) for i in range(warmup + steps) for name in order]
    else:
        schedule = [(i, name) for name in order for i in range(warmup + steps)]
    for i, name in schedule:
        seconds, states[name][2] = decode_step(*states[name])
        if i >= warmup:
            times[name].append(seconds)
    return times


class ComponentTimer:
    """Wall time per model component, from forward hooks (CPU ops are synchronous, so wall time is exact)."""

    def __init__(self, model, cache):
        self.totals, self.handles, self.starts = defaultdict(float), [], {}
        inner = model.model
        parts = {"embeddings": [inner.embed_tokens], "lm_head": [model.lm_head], "final_norm": [inner.norm]}
        for layer in inner.layers:
            a = layer.self_attn
            parts.setdefault("attn_self (all)", []).append(a)
            parts.setdefault("q/k/v projections", []).extend([a.q_proj, a.k_proj, a.v_proj])
            parts.setdefault("o projection", []).append(a.o_proj)
            parts.setdefault("mlp", []).append(layer.mlp)
            parts.setdefault("layer norms", []).extend([layer.input_layernorm, layer.post_attention_layernorm])
        for name, modules in parts.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(self._pre(m)))
                self.handles.append(m.register_forward_hook(self._post(name, m)))
        update = cache.update

        def timed_update(*args, **kwargs):  # instance attribute: this benchmark's cache only
            start = time.perf_counter()
            out = update(*args, **kwargs)
            self.totals["cache update"] += time.perf_counter() - start
            return out

        cache.update = timed_update

    def _pre(self, module):
        def hook(*_):
            self.starts[id(module)] = time.perf_counter()
        return hook

    def _post(self, name, module):
        def hook(*_):
            self.totals[name] += time.perf_counter() - self.starts.pop(id(module))
        return hook

    def step_ms(self, seconds: float) -> dict[str, float]:
        """This step's components in ms; attention core = self_attn - projections - cache update."""
        t = {k: v * 1e3 for k, v in self.totals.items()}
        attn = t.pop("attn_self (all)")
        t["attention core (rope, kernel)"] = attn - t["q/k/v projections"] - t["o projection"] - t["cache update"]
        t["other (residuals, mask, python)"] = seconds * 1e3 - attn - sum(
            t[k] for k in ("embeddings", "lm_head", "final_norm", "mlp", "layer norms"))
        t["total"] = seconds * 1e3
        self.totals.clear()
        return t

    def remove(self):
        for h in self.handles:
            h.remove()


def breakdown(sides: dict, kind: str, args, max_len: int) -> dict[str, dict[str, float]]:
    """Median ms per decode step by component over ``--profile-steps`` extra steps, alternated step by step."""
    states = new_states(sides, kind, args.batch, max_len)
    timers = {name: ComponentTimer(model, cache) for name, (model, cache, _) in states.items()}
    per_step = {name: [] for name in sides}
    try:
        for _ in range(args.profile_steps):
            for name in sides:
                seconds, states[name][2] = decode_step(*states[name])
                per_step[name].append(timers[name].step_ms(seconds))
    finally:
        for timer in timers.values():
            timer.remove()
    return {name: {k: round(statistics.median(t[k] for t in steps), 2) for k in steps[0]}
            for name, steps in per_step.items()}


def set_attention(sides: dict, impl: str) -> None:
    for side in sides.values():
        side["model"].set_attn_implementation(impl)


def run_repeat(sides: dict, result: dict, rep: int, args) -> None:
    """One alternated run of both sides in ``result``'s configuration; appends to ``result["runs"]``."""
    kind, impl = result["cache"], result["attn_implementation"]
    set_attention(sides, impl)
    names = list(sides)
    order = names if rep % 2 == 0 else names[::-1]
    states = new_states(sides, kind, args.batch, args.context + args.warmup_steps + args.new_tokens)
    result["kv_cache_bytes"] = {name: kv_cache_bytes(states[name][1]) for name in names}
    times = decode_alternated(states, order, args.warmup_steps, args.new_tokens, args.alternate)
    for name in order:
        tps = args.batch * len(times[name]) / sum(times[name])
        result["runs"][name].append({"tokens_per_s": round(tps, 2),
                                     "median_step_ms": round(statistics.median(times[name]) * 1e3, 2),
                                     "step_ms": [round(t * 1e3, 1) for t in times[name]]})
        print(f"  {kind:7s} {impl:10s} repeat {rep} {name:9s} {tps:8.1f} tok/s", flush=True)
    del states
    gc.collect()


def run_all(sides: dict, args) -> list[dict]:
    """Every configuration ``--repeats`` times. Repeats are the outer loop so that every configuration samples the
    whole session (the load of a shared CPU drifts); medians, ratios and breakdowns are computed at the end."""
    names = list(sides)
    results = [{"attn_implementation": impl, "cache": kind, "runs": {name: [] for name in names}}
               for kind in args.cache.split(",") for impl in args.attn_implementation.split(",")]
    for rep in range(args.repeats):
        for result in results:
            run_repeat(sides, result, rep, args)
    for result in results:
        med = {n: statistics.median(r["tokens_per_s"] for r in runs) for n, runs in result["runs"].items()}
        result["median_tokens_per_s"] = {n: round(v, 2) for n, v in med.items()}
        result["ratio_of_medians"] = round(med[names[1]] / med[names[0]], 3)
        result["per_repeat_ratios"] = [round(b["tokens_per_s"] / a["tokens_per_s"], 3)
                                       for a, b in zip(*(result["runs"][n] for n in names))]
        if args.profile_steps:
            set_attention(sides, result["attn_implementation"])
            result["breakdown_ms_per_step"] = breakdown(sides, result["cache"], args,
                                                        args.context + args.profile_steps)
            gc.collect()
    return results


def print_table(results: list[dict], names: list[str]) -> None:
    print(f"\n{'cache':8s} {'attention':11s} {names[0] + ' tok/s':>16s} {names[1] + ' tok/s':>16s} {'ratio':>6s}"
          f" {'KV MB ' + names[0]:>14s} {'KV MB ' + names[1]:>12s}  per-repeat ratios")
    for r in results:
        m, b = r["median_tokens_per_s"], r["kv_cache_bytes"]
        print(f"{r['cache']:8s} {r['attn_implementation']:11s} {m[names[0]]:16.1f} {m[names[1]]:16.1f} "
              f"{r['ratio_of_medians']:6.2f} {b[names[0]] / 1e6:14.0f} {b[names[1]] / 1e6:12.0f}  "
              + " ".join(f"{x:.2f}" for x in r["per_repeat_ratios"]))
    for r in results:
        if "breakdown_ms_per_step" in r:
            print(f"\nms per step, {r['cache']} cache, {r['attn_implementation']}:")
            bd = r["breakdown_ms_per_step"]
            for key in bd[names[0]]:
                print(f"  {key:34s} " + "  ".join(f"{bd[n][key]:9.2f}" for n in names))


def plot(results: list[dict], names: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{r['cache']}\n{r['attn_implementation']}" for r in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(1.8 * len(results) + 2, 4))
    for i, n in enumerate(names):
        ax.bar([j + 0.4 * i for j in x], [r["median_tokens_per_s"][n] for r in results], 0.4, label=n)
    for j, r in enumerate(results):
        top = max(r["median_tokens_per_s"].values())
        ax.text(j + 0.2, top, f"{r['ratio_of_medians']:.2f}x", ha="center", va="bottom")
    ax.set_xticks([j + 0.2 for j in x], labels)
    ax.set_ylabel("decode tokens/s (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    register_gqa_attention()
    model, tokenizer = load_default_model()
    converted = convert_to_gqa(model, args.num_key_value_heads)
    names = ["original", "mqa" if args.num_key_value_heads == 1 else f"gqa{args.num_key_value_heads}"]
    ids = context_ids(tokenizer, args.prefill_rows, args.context, args.tokens)
    load_start = os.getloadavg()
    sides = {}
    for name, m in zip(names, (model, converted)):
        m.set_attn_implementation("sdpa")
        start = time.perf_counter()
        kv, first = prefill(m, ids)
        print(f"prefill {name}: {args.prefill_rows} x {args.context} in {time.perf_counter() - start:.1f}s",
              flush=True)
        sides[name] = {"model": m, "kv": kv, "first": first}
    results = run_all(sides, args)
    report = {
        "settings": {k: v for k, v in vars(args).items()},
        "machine": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
                    "platform": platform.platform(), "processor": platform.processor(),
                    "python": sys.version.split()[0], "torch_config_parallel": torch.__config__.parallel_info()
                    .splitlines()[:6]},
        "library_versions": library_versions(),
        "models": {n: {"num_key_value_heads": s["model"].config.num_key_value_heads,
                       "num_attention_heads": s["model"].config.num_attention_heads,
                       "parameters": sum(p.numel() for p in s["model"].parameters())} for n, s in sides.items()},
        "results": results,
    }
    print_table(results, names)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(results, names, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
