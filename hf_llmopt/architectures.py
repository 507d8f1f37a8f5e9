"""The architecture table: what every feature needs to know about a model family, in one place.

Each entry is a frozen :class:`ArchSpec` keyed by ``config.model_type``. GQA reads the attention part, MoE and
offload the MLP part, LoRA the projection names. Resolution order (as peft's ``_prepare_adapter_config``):

1. an explicit user argument (``arch_spec=``) wins;
2. then the table (:data:`MODEL_TYPE_TO_ARCH_SPEC`);
3. then an entry inferred from transformers' own metadata (``config.base_model_tp_plan``), with one warning;
4. then an :class:`UnsupportedArchitectureError` naming close matches and listing every supported family.

Attention layouts (``AttentionSpec.layout``)::

    separate      q_proj / k_proj / v_proj are three nn.Linear          (llama, mistral, qwen2, gemma, ...)
    fused_concat  one nn.Linear whose rows are [ q(H*d) ; k(KV*d) ; v(KV*d) ]            (phi3 qkv_proj)
    fused_heads   one nn.Linear whose rows are per head [ q_h ; k_h ; v_h ], h = 0..H-1   (gpt_neox, bloom)
    conv1d_concat GPT-2 Conv1D (weight is (in, out), the transpose of nn.Linear), [ q ; k ; v ] along out
    falcon        falcon's query_key_value, whose layout depends on multi_query / new_decoder_architecture
    bigcode       gpt_bigcode c_attn: [ q(H*d) ; k(d) ; v(d) ] when multi_query, else per head like fused_heads

Families whose attention class can express ``num_key_value_heads < num_attention_heads`` are ``native``: their
converted checkpoints load with plain transformers. The others are converted into a patched attention module
(``hf_llmopt.gqa.patched``) that ``import hf_llmopt`` installs.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

logger = logging.getLogger(__name__)

ATTENTION_LAYOUTS = ("separate", "fused_concat", "fused_heads", "conv1d_concat", "falcon", "bigcode")
ROPE_LAYOUTS = ("rotate_half", "interleaved", "none")
KV_NORM_LAYOUTS = ("none", "shared", "flat", "per_head", "module_list")


class UnsupportedArchitectureError(ValueError):
    """Raised for a model family the table does not know and cannot infer."""


def _closed(cls, data: Mapping[str, Any]):
    """Build a dataclass from a mapping, refusing unknown keys (mergekit silently ignores them; we do not)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class AttentionSpec:
    """Where the attention projections live and how they are laid out.

    Args:
        module: attribute of a decoder layer holding the attention block.
        layout: one of :data:`ATTENTION_LAYOUTS` (see module docstring).
        q, k, v: projection names for the ``separate`` layout.
        qkv: fused projection name for the fused layouts.
        o: output projection name.
        o_conv1d: whether the output projection is a GPT-2 ``Conv1D`` (weight stored as (in, out)).
        kv_norm: name of a norm applied to keys after projection (qwen3 ``k_norm``, olmo2, cohere, stablelm).
        kv_norm_layout: ``shared`` (one head_dim vector for all heads), ``flat`` (KV*head_dim vector),
            ``per_head`` ((KV, head_dim) weight), ``module_list`` (``norms.{h}`` one module per KV head).
        q_norm: name of the matching query norm (never changes size; recorded for LoRA/targets).
        rope: ``rotate_half`` (pairs (i, i + d/2)), ``interleaved`` (pairs (2i, 2i + 1)) or ``none``.
        native: whether transformers' own class expresses fewer KV heads through ``kv_heads_attr``.
        kv_heads_attr: config attribute holding the number of KV heads (native families).
    """

    module: str = "self_attn"
    layout: str = "separate"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None
    o: str = "o_proj"
    o_conv1d: bool = False
    kv_norm: str | None = None
    kv_norm_layout: str = "none"
    q_norm: str | None = None
    rope: str = "rotate_half"
    native: bool = True
    kv_heads_attr: str = "num_key_value_heads"

    def __post_init__(self):
        if self.layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not one of {ATTENTION_LAYOUTS}")
        if self.rope not in ROPE_LAYOUTS:
            raise ValueError(f"rope={self.rope!r} is not one of {ROPE_LAYOUTS}")
        if self.kv_norm_layout not in KV_NORM_LAYOUTS:
            raise ValueError(f"kv_norm_layout={self.kv_norm_layout!r} is not one of {KV_NORM_LAYOUTS}")
        if self.layout != "separate" and not self.qkv:
            raise ValueError(f"layout={self.layout!r} needs the fused projection name `qkv`")

    @property
    def projection_names(self) -> tuple[str, ...]:
        if self.layout == "separate":
            return (self.q, self.k, self.v, self.o)
        return (self.qkv, self.o)


@dataclass(frozen=True)
class MLPSpec:
    """The feed-forward block of a decoder layer.

    Args:
        module: attribute of a decoder layer holding the MLP.
        gate, up, down: projection names; ``gate`` is ``None`` for a plain (non-gated) MLP.
        gate_up: fused gate+up projection name (phi3, glm), ``None`` otherwise.
        conv1d: whether the projections are GPT-2 ``Conv1D``.
        native_moe: the transformers model_type a sparse upcycling of this family can become natively.
    """

    module: str = "mlp"
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None
    conv1d: bool = False
    native_moe: str | None = None

    @property
    def projection_names(self) -> tuple[str, ...]:
        names = (self.gate_up,) if self.gate_up else (self.gate, self.up)
        return tuple(n for n in (*names, self.down) if n)


@dataclass(frozen=True)
class ArchSpec:
    """Everything the features need to know about one model family.

    Args:
        model_type: ``config.model_type``.
        layers: dotted path from the ``*ForCausalLM`` model to the list of decoder layers.
        attention: the attention block, see :class:`AttentionSpec`.
        mlp: the MLP block, see :class:`MLPSpec`.
        heads_attr: config attribute holding the number of query heads.
        inferred: ``True`` when the entry was inferred from ``base_model_tp_plan`` rather than taken from the table.
    """

    model_type: str
    layers: str = "model.layers"
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    mlp: MLPSpec = field(default_factory=MLPSpec)
    heads_attr: str = "num_attention_heads"
    inferred: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArchSpec":
        """Build an entry from plain data (JSON/YAML); unknown keys are an error."""
        data = dict(data)
        if "attention" in data and isinstance(data["attention"], Mapping):
            data["attention"] = _closed(AttentionSpec, data["attention"])
        if "mlp" in data and isinstance(data["mlp"], Mapping):
            data["mlp"] = _closed(MLPSpec, data["mlp"])
        return _closed(cls, data)

    @property
    def lora_target_modules(self) -> tuple[str, ...]:
        """Default LoRA targets: every attention and MLP projection."""
        return self.attention.projection_names + self.mlp.projection_names


def _llama_like(model_type: str, **attention) -> ArchSpec:
    return ArchSpec(model_type, attention=AttentionSpec(**attention))


MODEL_TYPE_TO_ARCH_SPEC: dict[str, ArchSpec] = {}


def register_arch_spec(spec: ArchSpec, overwrite: bool = False) -> ArchSpec:
    """Add a family to the table. Registering an existing ``model_type`` needs ``overwrite=True``."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"expected an ArchSpec, got {type(spec).__name__}")
    if spec.model_type in MODEL_TYPE_TO_ARCH_SPEC and not overwrite:
        raise ValueError(f"model_type {spec.model_type!r} is already registered; pass overwrite=True to replace it")
    MODEL_TYPE_TO_ARCH_SPEC[spec.model_type] = spec
    return spec


for _spec in (
    # Native GQA families: transformers' attention class reads config.num_key_value_heads.
    *(_llama_like(t) for t in ("llama", "mistral", "qwen2", "gemma", "gemma2", "granite", "olmo",
                               "smollm3", "ministral", "mixtral", "qwen2_moe")),
    ArchSpec("starcoder2", mlp=MLPSpec(gate=None, up="c_fc", down="c_proj")),
    _llama_like("helium", rope="interleaved"),
    ArchSpec("glm", attention=AttentionSpec(rope="interleaved"), mlp=MLPSpec(gate=None, gate_up="gate_up_proj")),
    _llama_like("qwen3", kv_norm="k_norm", kv_norm_layout="shared", q_norm="q_norm"),
    _llama_like("qwen3_moe", kv_norm="k_norm", kv_norm_layout="shared", q_norm="q_norm"),
    _llama_like("gemma3_text", kv_norm="k_norm", kv_norm_layout="shared", q_norm="q_norm"),
    _llama_like("exaone4", kv_norm="k_norm", kv_norm_layout="shared", q_norm="q_norm"),
    _llama_like("olmo2", kv_norm="k_norm", kv_norm_layout="flat", q_norm="q_norm"),
    _llama_like("cohere", kv_norm="k_norm", kv_norm_layout="per_head", q_norm="q_norm", rope="interleaved"),
    _llama_like("stablelm", kv_norm="k_layernorm", kv_norm_layout="module_list", q_norm="q_layernorm"),
    ArchSpec("phi", attention=AttentionSpec(o="dense", kv_norm="k_layernorm", kv_norm_layout="shared",
                                            q_norm="q_layernorm"),
             mlp=MLPSpec(gate=None, up="fc1", down="fc2")),
    ArchSpec("phi3", attention=AttentionSpec(layout="fused_concat", qkv="qkv_proj"),
             mlp=MLPSpec(gate=None, gate_up="gate_up_proj")),
    # Families that cannot express fewer KV heads: converted into hf_llmopt's patched attention.
    ArchSpec("gpt2", layers="transformer.h",
             attention=AttentionSpec(module="attn", layout="conv1d_concat", qkv="c_attn", o="c_proj",
                                     o_conv1d=True, rope="none", native=False),
             mlp=MLPSpec(gate=None, up="c_fc", down="c_proj", conv1d=True), heads_attr="n_head"),
    ArchSpec("gptj", layers="transformer.h",
             attention=AttentionSpec(module="attn", o="out_proj", rope="interleaved", native=False),
             mlp=MLPSpec(gate=None, up="fc_in", down="fc_out"), heads_attr="n_head"),
    ArchSpec("opt", layers="model.decoder.layers",
             attention=AttentionSpec(o="out_proj", rope="none", native=False),
             mlp=MLPSpec(module="", gate=None, up="fc1", down="fc2")),
    ArchSpec("gpt_neox", layers="gpt_neox.layers",
             attention=AttentionSpec(module="attention", layout="fused_heads", qkv="query_key_value", o="dense",
                                     native=False),
             mlp=MLPSpec(gate=None, up="dense_h_to_4h", down="dense_4h_to_h")),
    ArchSpec("bloom", layers="transformer.h",
             attention=AttentionSpec(module="self_attention", layout="fused_heads", qkv="query_key_value",
                                     o="dense", rope="none", native=False),
             mlp=MLPSpec(gate=None, up="dense_h_to_4h", down="dense_4h_to_h"), heads_attr="n_head"),
    ArchSpec("falcon", layers="transformer.h",
             attention=AttentionSpec(module="self_attention", layout="falcon", qkv="query_key_value", o="dense",
                                     native=False),
             mlp=MLPSpec(gate=None, up="dense_h_to_4h", down="dense_4h_to_h")),
    ArchSpec("gpt_bigcode", layers="transformer.h",
             attention=AttentionSpec(module="attn", layout="bigcode", qkv="c_attn", o="c_proj", rope="none",
                                     native=False),
             mlp=MLPSpec(gate=None, up="c_fc", down="c_proj"), heads_attr="n_head"),
):
    register_arch_spec(_spec)


def _infer_from_tp_plan(config) -> ArchSpec | None:
    """Infer a llama-like entry from ``config.base_model_tp_plan`` (names q/k/v/o and the MLP for most families)."""
    plan = getattr(config, "base_model_tp_plan", None) or {}
    attn = {}
    mlp = {}
    for key in plan:
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or parts[1] != "*":
            continue
        block, name = parts[2], parts[3]
        if name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attn.setdefault("module", block)
            attn[name[0]] = name
        elif name in ("gate_proj", "up_proj", "down_proj"):
            mlp.setdefault("module", block)
            mlp[name.split("_")[0]] = name
    if set(attn) != {"module", "q", "k", "v", "o"} or not hasattr(config, "num_key_value_heads"):
        return None
    mlp_spec = MLPSpec(**mlp) if {"up", "down"} <= set(mlp) else MLPSpec()
    if "gate" not in mlp:
        mlp_spec = dataclasses.replace(mlp_spec, gate=None)
    return ArchSpec(config.model_type, attention=AttentionSpec(**attn), mlp=mlp_spec, inferred=True)


def unknown_family_message(model_type: str) -> str:
    supported = sorted(MODEL_TYPE_TO_ARCH_SPEC)
    close = difflib.get_close_matches(model_type, supported, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"Model family {model_type!r} is not in hf_llmopt's architecture table and could not be inferred from "
        f"its config.{hint} Supported families: {', '.join(supported)}. Pass arch_spec=ArchSpec(...) or register "
        f"one with hf_llmopt.register_arch_spec()."
    )


_warned_inferred: set[str] = set()


def get_arch_spec(config_or_model, arch_spec: ArchSpec | Mapping | None = None) -> ArchSpec:
    """Resolve the :class:`ArchSpec` of a config or model: explicit argument, table, inference, error."""
    if arch_spec is not None:
        return arch_spec if isinstance(arch_spec, ArchSpec) else ArchSpec.from_dict(arch_spec)
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_TYPE_TO_ARCH_SPEC:
        return MODEL_TYPE_TO_ARCH_SPEC[model_type]
    inferred = _infer_from_tp_plan(config) if model_type else None
    if inferred is not None:
        if model_type not in _warned_inferred:
            _warned_inferred.add(model_type)
            logger.warning(
                "Model family %r is not in hf_llmopt's architecture table; using names inferred from "
                "config.base_model_tp_plan (attention %s.%s/%s/%s/%s). Register an ArchSpec to silence this.",
                model_type, inferred.attention.module, inferred.attention.q, inferred.attention.k,
                inferred.attention.v, inferred.attention.o,
            )
        return inferred
    raise UnsupportedArchitectureError(unknown_family_message(str(model_type)))
