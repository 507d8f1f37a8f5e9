"""Patched attention for families whose transformers class cannot express fewer KV heads.

A converted checkpoint of such a family (gpt2, gptj, opt, gpt_neox, bloom, falcon, gpt_bigcode) keeps its
``model_type`` and carries ``config.hf_llmopt_gqa = {"num_key_value_heads": G, ...}``. After ``import hf_llmopt``,
plain ``AutoModelForCausalLM.from_pretrained`` rebuilds it with the patched attention of
``hf_llmopt.gqa.patched.<family>``: separate ``q_proj``/``k_proj``/``v_proj`` and a cache of ``G`` heads.

How construction is redirected: :func:`install_patches` gives the family's original attention class (for example
``GPT2Attention``) a ``__new__`` that returns an instance of the patched subclass when, and only when, the config
passed to it carries the record (and, for GPT-2/BigCode, it is not a cross-attention block). Python then runs the
patched ``__init__``. Nothing else changes: every place that names the original class (the decoder layer,
Falcon's ``FALCON_ATTENTION_CLASSES``, ``_init_weights``'s ``isinstance`` checks, the output recorders) keeps working,
because the patched class subclasses the original. A model whose config has no record constructs exactly the
original class with the original ``__init__``.

The family's modeling module is not imported by ``import hf_llmopt`` (that would cost seconds): a ``sys.meta_path``
hook patches it right after transformers imports it; a module already imported is patched at once.

Example:
    >>> import hf_llmopt  # installs the patches
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("path/to/converted-gpt2")  # doctest: +SKIP
    >>> type(model.transformer.h[0].attn).__name__  # doctest: +SKIP
    'GPT2GQAAttention'
"""

from __future__ import annotations

import importlib
import importlib.abc
import inspect
import sys
from dataclasses import dataclass

from torch import nn

from .base import gqa_record


@dataclass(frozen=True)
class PatchedFamily:
    """Where a family's attention lives in transformers and which hf_llmopt class replaces it.

    Args:
        modeling_module: the transformers module defining the attention classes.
        attention_classes: class names in ``modeling_module`` whose construction is redirected.
        patched_module: module under ``hf_llmopt.gqa.patched`` defining the replacement.
        patched_class: name of the replacement class (a subclass of ``attention_classes[0]``).
    """

    modeling_module: str
    attention_classes: tuple[str, ...]
    patched_module: str
    patched_class: str


def _family(name: str, attention: str, patched: str, *extra: str) -> PatchedFamily:
    return PatchedFamily(f"transformers.models.{name}.modeling_{name}", (attention, *extra), name, patched)


PATCHED_FAMILIES: dict[str, PatchedFamily] = {
    "gpt2": _family("gpt2", "GPT2Attention", "GPT2GQAAttention"),
    "gptj": _family("gptj", "GPTJAttention", "GPTJGQAAttention"),
    "opt": _family("opt", "OPTAttention", "OPTGQAAttention"),
    "gpt_neox": _family("gpt_neox", "GPTNeoXAttention", "GPTNeoXGQAAttention"),
    "bloom": _family("bloom", "BloomAttention", "BloomGQAAttention"),
    # FalconDecoderLayer picks FalconFlashAttention2 under flash_attention_2; both become the patched class.
    "falcon": _family("falcon", "FalconAttention", "FalconGQAAttention", "FalconFlashAttention2"),
    "gpt_bigcode": _family("gpt_bigcode", "GPTBigCodeAttention", "GPTBigCodeGQAAttention"),
}

_REDIRECTS: dict[type, str] = {}  # original attention class -> model_type of its patched class
_PATCHED_CLASSES: dict[str, type] = {}
_SIGNATURES: dict[type, inspect.Signature] = {}  # patched class -> its __init__ signature
_INSTALLED: set[str] = set()
_PENDING: dict[str, str] = {}  # modeling module name -> model_type, patched on import


def _patched_class(model_type: str) -> type:
    """The replacement class, imported on first use (its module imports the transformers module being patched)."""
    cls = _PATCHED_CLASSES.get(model_type)
    if cls is None:
        family = PATCHED_FAMILIES[model_type]
        module = importlib.import_module(f"{__name__}.{family.patched_module}")
        cls = _PATCHED_CLASSES[model_type] = getattr(module, family.patched_class)
    return cls


def _is_self_attention(patched: type, args: tuple, kwargs: dict) -> bool:
    """Whether the constructor arguments build a self-attention block (GPT-2/BigCode also build cross-attention).

    The arguments are bound to the patched class's ``__init__``, which mirrors the original's (Falcon's flash
    variant only has ``*args, **kwargs``).
    """
    signature = _SIGNATURES.get(patched)
    if signature is None:
        signature = _SIGNATURES[patched] = inspect.signature(patched.__init__)
    try:
        bound = signature.bind(None, *args, **kwargs).arguments
    except TypeError:
        return False  # let the original __init__ raise its own error
    return not bound.get("is_cross_attention", False)


def _dispatching_new(cls, *args, **kwargs):
    """``__new__`` of a patched family's original attention class: pick the patched class for converted configs."""
    model_type = _REDIRECTS.get(cls)
    if model_type is not None:
        config = kwargs.get("config", args[0] if args else None)  # every family takes the config first
        if gqa_record(config) is not None:
            patched = _patched_class(model_type)
            if _is_self_attention(patched, args, kwargs):
                cls = patched
    # Python runs type(obj).__init__ next: obj is still an instance of the class being called.
    return nn.Module.__new__(cls)


def _install_family(model_type: str) -> None:
    if model_type in _INSTALLED:
        return
    family = PATCHED_FAMILIES[model_type]
    modeling = importlib.import_module(family.modeling_module)
    for name in family.attention_classes:
        original = getattr(modeling, name)
        if "__new__" in original.__dict__ and original.__dict__["__new__"] is not _DISPATCHING_NEW:
            raise RuntimeError(f"{original.__qualname__} already defines __new__; hf_llmopt cannot patch it safely")
        _REDIRECTS[original] = model_type
        original.__new__ = _DISPATCHING_NEW
    _INSTALLED.add(model_type)
    _PENDING.pop(family.modeling_module, None)


_DISPATCHING_NEW = staticmethod(_dispatching_new)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the family the module defines."""

    def __init__(self, loader, model_type: str):
        self._loader = loader
        self._model_type = model_type

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _install_family(self._model_type)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect and linecache
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of the modeling modules in ``_PENDING``; every other import is left to the next finder."""

    def find_spec(self, fullname, path=None, target=None):
        model_type = _PENDING.get(fullname)
        if model_type is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader, model_type)
        return spec


_FINDER = _PatchOnImport()


def install_patches() -> None:
    """Make every family in :data:`PATCHED_FAMILIES` build its patched attention for converted configs (idempotent).

    Families whose modeling module is already imported are patched now; the others when transformers imports them.
    """
    for model_type, family in PATCHED_FAMILIES.items():
        if model_type in _INSTALLED:
            continue
        if family.modeling_module in sys.modules:
            _install_family(model_type)
        else:
            _PENDING[family.modeling_module] = model_type
    if _PENDING and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall_patches() -> None:
    """Undo :func:`install_patches`: converted configs build the original classes again; nothing is patched on import.

    The dispatching ``__new__`` stays on the original classes as a pass-through: deleting a ``__new__`` assigned
    after class creation does not give CPython its ``object.__new__`` slot back (construction would then fail with
    "object.__new__() takes exactly one argument").
    """
    _REDIRECTS.clear()
    _INSTALLED.clear()
    _PENDING.clear()
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def ensure_installed(model_type: str) -> None:
    """Patch ``model_type`` now (importing its modeling module); raise if hf_llmopt has no patched attention for it."""
    if model_type not in PATCHED_FAMILIES:
        raise NotImplementedError(
            f"GQA conversion of {model_type!r} needs a patched attention; hf_llmopt has one for "
            f"{', '.join(sorted(PATCHED_FAMILIES))}"
        )
    _install_family(model_type)


__all__ = ["PATCHED_FAMILIES", "PatchedFamily", "install_patches", "uninstall_patches", "ensure_installed"]
