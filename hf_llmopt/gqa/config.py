"""Configuration of a GQA/MQA conversion."""

from __future__ import annotations

from dataclasses import dataclass, field

GQA_METHODS = ("mean", "data_aware", "data_aware_values", "auto")
LAYERWISE_INPUTS = ("original", "converted")
STATIC_KEY_FITS = ("joint", "separate")


@dataclass
class GQAConfig:
    """How to convert a causal LM's attention to fewer key/value heads.

    Grouped-query attention (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
    Multi-Head Checkpoints") shares each key/value head among a group of query heads; multi-query attention
    (Shazeer 2019, "Fast Transformer Decoding: One Write-Head is All You Need") is the single-group case.
    The KV cache shrinks by ``num_key_value_heads / num_attention_heads``.

    Args:
        num_key_value_heads: ``G``, the number of KV heads after conversion. Must divide the number of query heads.
            ``G = 1`` is MQA; ``G`` larger than the current KV heads expands by repeating heads (lossless).
        method: ``"mean"`` mean-pools the K and V projections of each group (the paper's initialisation).
            ``"data_aware"`` fits the shared keys and values in closed form from calibration statistics
            (values: reduced-rank fit as seen through the output projection; keys: per frequency pair, a complex
            rank-1 fit that commutes with RoPE) and folds each head's correction into its query and output
            projections. ``"data_aware_values"`` applies the value fit only, with mean-pooled keys.
            ``"auto"`` picks the method recommended by the benchmarks (``data_aware``).
        calibration_tokens: how many calibration tokens the data-aware methods collect statistics from.
        calibration_seq_len: length of each calibration sequence.
        layerwise_calibration: after the closed form, fit each converted attention block (Adam on its q/k/v/o
            projections) to reproduce the original block's output on calibration inputs. No end-to-end training.
        layerwise_minutes: wall-clock budget of the layer-wise stage, shared by all layers.
        layerwise_lr: Adam learning rate of the layer-wise stage (5e-4 with the drift target; SmolLM2 at 3 -> 1 KV
            heads after 10 minutes, 2 threads: 1.89x / 1.97x of the original chat / prose perplexity at 5e-4, 1.90x /
            2.0002x at 3e-4; on 1 thread next to another job 1.98x / 2.04x at 5e-4, 1.99x / 2.08x at 3e-4, 2.02x /
            2.13x at 2e-4. Before the drift target 3e-4 was best: at 1e-3 the first steps undid more than short
            budgets recovered).
        layerwise_batch_size: calibration sequences per Adam step of the layer-wise stage (2: twice the steps of 4
            in the same time; SmolLM2 at 3 -> 1 KV heads after 10 minutes, converted inputs, ``layerwise_drift=0``,
            lr 3e-4: 2.02x / 2.07x of the original chat / prose perplexity against 2.04x / 2.09x with 4).
        layerwise_inputs: what each block is fed during the layer-wise stage: ``"converted"`` (the converted model's
            own hidden states, blocks fitted first to last, each also absorbing the drift the earlier ones left) or
            ``"original"`` (the original model's hidden states; every block fitted independently). SmolLM2 at 3 -> 1
            KV heads after 10 minutes (batch 4, ``layerwise_drift=0``, lr 3e-4): 2.04x / 2.09x of the original chat /
            prose perplexity with ``"converted"``, 2.05x / 2.16x with ``"original"``.
        layerwise_drift: with ``layerwise_inputs="converted"``, how much of the residual stream's drift (the original
            model's hidden state minus the converted model's, at the block's input) each block is also fit to cancel:
            its target is the original block's output plus ``layerwise_drift`` times the drift, so that after the
            residual addition the converted hidden state moves back towards the original one. ``0`` fits the
            original block's output alone. With original inputs there is no drift. SmolLM2 at 3 -> 1 KV heads after
            10 minutes (1 thread, next to another job): 1.99x / 2.08x of the original chat / prose perplexity with
            ``1``, 2.01x / 2.08x with ``0.5``, 2.10x / 2.15x with ``0``; with 2 threads alone 1.90x / 2.00x with
            ``1`` against 2.02x / 2.07x with ``0``.
        logit_scale: after fitting the keys (``data_aware``), multiply every attention logit by one factor (through
            the query projections): ``"auto"`` searches it on the calibration text (the KL from the original model's
            next-token distributions there; again after the layer-wise stage, inside its budget), a number fixes it
            (applied once), ``"off"`` leaves the logits alone. Least-squares key fits shrink the logits (see
            :mod:`hf_llmopt.gqa.sharpen`).
        static_rope_angle: RoPE frequency pairs that turn by at most this many radians across the model's context
            window (``max_position_embeddings``) count as not rotated: their keys are fitted with any per-head linear
            map (on joint query-key moments) instead of a complex scalar per pair (``data_aware``; 0 treats every
            pair as rotating). Larger fits short text better and long range worse. SmolLM2 at 3 -> 1 KV heads: 1.5
            (the default, 8 of 32 pairs) gives 2.77x / 2.98x of the original chat / prose perplexity on 256-token
            text and 11.8x on 2,048-token packed chat; 0.5 (5 pairs) 3.38x / 3.13x and 9.7x (the README's Long
            range; see ``static_key_fit`` for long contexts).
        static_key_fit: how the static pairs' key maps are fitted: ``"joint"`` (the default) on joint query-key
            moments, each query with the covariance of the keys in its own prefix; ``"separate"`` on separate query
            and key moments, the fit before it, better at long range (SmolLM2, 0.35: 3.35x / 3.37x and 6.1x). Joint
            falls back to separate above 2^22 moment entries per layer; the record says which ran.
        group_by_similarity: for ``G > 1``, group KV heads whose keys/values are most alike instead of contiguous
            groups (data-aware methods only; mean pooling keeps the paper's contiguous groups).
        seed: seeds calibration sampling.
    """

    num_key_value_heads: int = field(metadata={"help": "G, the number of KV heads after conversion (1 = MQA)."})
    method: str = field(default="mean", metadata={"help": f"One of {GQA_METHODS}."})
    calibration_tokens: int = field(default=12288, metadata={"help": "Calibration tokens (data-aware methods)."})
    calibration_seq_len: int = field(default=256, metadata={"help": "Length of each calibration sequence."})
    layerwise_calibration: bool = field(default=False, metadata={"help": "Fit each converted attention block "
                                        "to the original block's output after the closed form."})
    layerwise_minutes: float = field(default=5.0, metadata={"help": "Budget of the layer-wise stage, minutes."})
    layerwise_lr: float = field(default=5e-4, metadata={"help": "Adam learning rate of the layer-wise stage."})
    layerwise_batch_size: int = field(default=2, metadata={"help": "Calibration sequences per Adam step of the "
                                      "layer-wise stage."})
    layerwise_inputs: str = field(default="converted", metadata={"help": "Hidden states fed to each block in the "
                                  "layer-wise stage: 'original' (the original model's) or 'converted' (its own).",
                                  "choices": list(LAYERWISE_INPUTS)})
    layerwise_drift: float = field(default=1.0, metadata={"help": "Fraction of the residual drift (original minus "
                                   "converted hidden state) each block is also fit to cancel (converted inputs)."})
    logit_scale: str = field(default="auto", metadata={"help": "Logit scale after fitting the keys (data_aware): "
                             "'auto' (searched on the calibration text), 'off', or a number."})
    static_rope_angle: float = field(default=1.5, metadata={"help": "RoPE pairs turning by at most this many "
                                     "radians over the context window get any per-head key map (data_aware); 0: "
                                     "none. Larger fits short text better, long range worse (see the README's "
                                     "Long range)."})
    static_key_fit: str = field(default="joint", metadata={"help": "Fit of the static pairs' key maps: 'joint' "
                                "(query-key moments) or 'separate' (better at long range, with "
                                "--static-rope-angle 0.35)."})
    group_by_similarity: bool = field(default=True, metadata={"help": "Group similar KV heads (G > 1, "
                                      "data-aware methods)."})
    seed: int = field(default=0, metadata={"help": "Seed of calibration sampling."})

    def __post_init__(self):
        if not isinstance(self.num_key_value_heads, int) or isinstance(self.num_key_value_heads, bool):
            raise TypeError(f"num_key_value_heads must be an int, got {self.num_key_value_heads!r}")
        if self.num_key_value_heads < 1:
            raise ValueError(f"num_key_value_heads must be >= 1, got {self.num_key_value_heads}")
        if self.method not in GQA_METHODS:
            raise ValueError(f"method={self.method!r} is not one of {GQA_METHODS}")
        if self.calibration_tokens < 1 or self.calibration_seq_len < 2:
            raise ValueError("calibration_tokens must be >= 1 and calibration_seq_len >= 2")
        if self.layerwise_inputs not in LAYERWISE_INPUTS:
            raise ValueError(f"layerwise_inputs={self.layerwise_inputs!r} is not one of {LAYERWISE_INPUTS}")
        if not 0.0 <= self.layerwise_drift <= 1.0:
            raise ValueError(f"layerwise_drift must be between 0 and 1, got {self.layerwise_drift}")
        self.logit_scale = _logit_scale_value(self.logit_scale)
        if self.layerwise_batch_size < 1:
            raise ValueError(f"layerwise_batch_size must be >= 1, got {self.layerwise_batch_size}")
        if not 0.0 <= self.static_rope_angle < float("inf"):
            raise ValueError(f"static_rope_angle must be a finite number >= 0, got {self.static_rope_angle}")
        if self.static_key_fit not in STATIC_KEY_FITS:
            raise ValueError(f"static_key_fit={self.static_key_fit!r} is not one of {STATIC_KEY_FITS}")
        if self.layerwise_minutes <= 0:
            raise ValueError(f"layerwise_minutes must be > 0, got {self.layerwise_minutes}")


def _logit_scale_value(value) -> str:
    """``"auto"``, ``"off"`` or a positive number, normalised to a string (the CLI passes strings)."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise ValueError(f"logit_scale={value!r} must be 'auto', 'off' or a positive number")
    return f"{number:g}"
