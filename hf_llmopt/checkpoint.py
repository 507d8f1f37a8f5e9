"""Writing converted checkpoints: safetensors only, the conversion recorded, a model card, all or nothing.

The folder is written into a temporary sibling and renamed at the end, so an interrupted run leaves no
half-written output. The result is a normal Hub repository folder (``config.json``, ``model.safetensors``,
tokenizer files, ``README.md`` with Hub metadata): ``huggingface_hub.upload_folder`` or ``model.push_to_hub`` take it
as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Mapping

RECORD_FILE = "hf_llmopt.json"


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a non-empty existing folder unless ``overwrite`` (checked before any expensive work)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    return out


def render_card(template: str, context: Mapping[str, Any]) -> str:
    """Fill a ``model_cards/`` template (``$name`` placeholders). A placeholder without a value is an error."""
    text = resources.files("hf_llmopt.model_cards").joinpath(template).read_text(encoding="utf-8")
    try:
        return Template(text).substitute({k: str(v) for k, v in context.items()})
    except KeyError as err:
        raise KeyError(f"model card template {template} needs a value for {err}") from None


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_no measurements_"
    columns = columns or list(rows[0])
    fmt = lambda v: (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}") if isinstance(v, float) else str(v)  # noqa
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_converted(model, tokenizer, output_dir: str | os.PathLike, card_template: str | None = None,
                   card_context: Mapping[str, Any] | None = None, record: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> Path:
    """Save ``model`` (+ tokenizer, model card, conversion record) to ``output_dir`` atomically.

    Args:
        model: the converted model; saved as safetensors only.
        tokenizer: saved alongside when given.
        output_dir: destination folder; an existing non-empty folder needs ``overwrite=True``.
        card_template: file name in ``model_cards/`` rendered into ``README.md``.
        card_context: values for the template's ``$placeholders``.
        record: written to ``hf_llmopt.json`` (what was done, with which versions, what was measured).

    Returns:
        The output folder.
    """
    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final folder gets the usual permissions
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card_template:
            (tmp / "README.md").write_text(render_card(card_template, card_context or {}), encoding="utf-8")
        if record is not None:
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        pickled = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickled:
            raise RuntimeError(f"refusing to write pickled weights {pickled}; checkpoints are safetensors only")
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
