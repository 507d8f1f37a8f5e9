"""hf_llmopt: make Hugging Face causal LMs cheaper to serve and train, inside the tools you already use."""

__version__ = "0.1.0"

from .architectures import (  # noqa: E402
    MODEL_TYPE_TO_ARCH_SPEC,
    ArchSpec,
    AttentionSpec,
    MLPSpec,
    UnsupportedArchitectureError,
    get_arch_spec,
    register_arch_spec,
)
from .gqa import GQAConfig, convert_to_gqa, register_gqa_method  # noqa: E402
from .gqa.attention import GQA_ATTENTION_NAME, register_gqa_attention  # noqa: E402
from .models import load_causal_lm, load_default_model  # noqa: E402
from .gqa.patched import install_patches as _install_patches  # noqa: E402

# Converted checkpoints of families that cannot express fewer KV heads natively record the conversion in their
# config; importing hf_llmopt lets plain AutoModelForCausalLM.from_pretrained rebuild their patched attention.
_install_patches()
# attn_implementation="gqa_packed": decode attention over the stored KV heads, never expanded (registered through
# transformers' public AttentionInterface; idempotent).
register_gqa_attention()

__all__ = [
    "ArchSpec", "AttentionSpec", "MLPSpec", "MODEL_TYPE_TO_ARCH_SPEC", "UnsupportedArchitectureError",
    "get_arch_spec", "register_arch_spec", "GQAConfig", "convert_to_gqa", "register_gqa_method",
    "load_causal_lm", "load_default_model", "GQA_ATTENTION_NAME", "register_gqa_attention", "__version__",
]
