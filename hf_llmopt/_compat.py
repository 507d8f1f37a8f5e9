"""Every difference between library versions lives here.

transformers 5 moved RoPE settings to ``config.rope_parameters`` (v4: ``rope_theta`` / ``rope_scaling``), renamed
``past_key_values`` to ``cache`` in attention modules, made ``apply_chat_template(..., return_tensors="pt")``
return a dict, and took ``processing_class`` instead of ``tokenizer`` in the Trainer.
"""

from __future__ import annotations

import importlib.metadata

import torch


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("hf_llmopt", "transformers", "torch", "peft", "accelerate", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def rope_parameters(config) -> dict:
    """RoPE settings of a config as a dict with at least ``rope_type`` and ``rope_theta`` when the model has RoPE."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    out = dict(getattr(config, "rope_scaling", None) or {})  # transformers 4
    if getattr(config, "rope_theta", None) is not None:
        out.setdefault("rope_theta", config.rope_theta)
        out.setdefault("rope_type", out.pop("type", "default"))
    return out


def is_causal_lm(model) -> bool:
    """A transformers model that predicts the next token (anything AutoModelForCausalLM can build)."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model, PreTrainedModel):
        return False
    if type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return True
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def chat_input_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a chat, whether ``apply_chat_template`` returns a list, a tensor or a dict."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers ``Cache`` (or a legacy tuple of tuples)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for item in cache:
        for t in item:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
