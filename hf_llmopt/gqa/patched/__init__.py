"""Patched attention for families whose transformers class cannot express fewer KV heads.

Placeholder registry: each family module registers itself in PATCHED_FAMILIES.
"""

PATCHED_FAMILIES: dict = {}


def install_patches() -> None:
    """Install every family's patch (idempotent)."""


def ensure_installed(model_type: str) -> None:
    if model_type not in PATCHED_FAMILIES:
        raise NotImplementedError(f"GQA conversion of {model_type!r} needs a patched attention, not available yet")
