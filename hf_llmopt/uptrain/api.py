"""The uptraining recipe: convert (optionally), fit layer-wise, train with the Trainer, merge, write the checkpoint.

Used by ``hf-llmopt uptrain``, ``examples/uptrain_gqa.py`` and ``benchmarks/uptrain_gqa.py``. Every step runs the
same under ``accelerate launch``: work that must happen once (sampling data, the layer-wise stage, measurements for
the card, writing the folder) runs on the main process and its result is shared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from ..architectures import get_arch_spec
from ..checkpoint import check_output_dir, save_converted
from ..data import sampling_pad_token_id, token_blocks
from ..evaluation import kl_to_reference, perplexity
from ..gqa.config import GQAConfig
from ..gqa.convert import CONFIG_RECORD_KEY, convert_to_gqa, get_decoder_layers, num_heads_of
from ..models import load_causal_lm
from ..gqa.balance import balance_attention_scales
from .callbacks import CurvesCallback, TrainingClockCallback
from .card import card_context
from .config import UptrainConfig
from .trainable import add_lora, merge_lora, select_trainable
from .trainer import TokenBlockDataset, UptrainTrainer

logger = logging.getLogger(__name__)

INIT_MODEL_DIR = "init_model"  # in checkpoint_dir: the base LoRA adapters apply to (converted + layer-wise)
BEFORE_FILE = "before_training.json"  # in checkpoint_dir: measurements taken before training, for a resume
CALIBRATION_TOKENS = GQAConfig.__dataclass_fields__["calibration_tokens"].default  # data-aware init's default


@dataclass
class UptrainResult:
    """What :func:`uptrain` returns: the trained model (LoRA merged) and everything it measured."""

    model: Any
    tokenizer: Any
    metrics: dict
    output_dir: Path | None
    log_history: list = field(default_factory=list)


@dataclass
class _Data:
    train: torch.Tensor
    eval: torch.Tensor
    train_description: str
    eval_description: str
    pad_token_id: int | None = None  # self-sampled blocks are padded after their EOS; packed text is not
    eval_pad_token_id: int | None = None


def _resolve_resume(config: UptrainConfig) -> str | None:
    value = config.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if value in ("last", "true", "True"):
        found = get_last_checkpoint(config.checkpoint_dir) if os.path.isdir(config.checkpoint_dir) else None
        if found is None:
            logger.warning("resume_from_checkpoint=%s: no checkpoint in %s; starting from scratch", value,
                           config.checkpoint_dir)
        return found
    if not os.path.isdir(value):
        raise FileNotFoundError(f"resume_from_checkpoint={value!r} is not a checkpoint folder")
    return value


def _load(model_or_name, tokenizer=None):
    if isinstance(model_or_name, (str, os.PathLike)):
        model, loaded_tokenizer = load_causal_lm(str(model_or_name))
        return model, tokenizer or loaded_tokenizer
    return model_or_name, tokenizer


def _name(model) -> str | None:
    return getattr(model.config, "_name_or_path", None) or None


def _recorded_teacher(model) -> str | None:
    record = getattr(model.config, CONFIG_RECORD_KEY, None) or {}
    return record.get("source_model")


def prepare_data(config: UptrainConfig, tokenizer, sampler, train_data=None, eval_data=None) -> _Data:
    """Training and held-out blocks. Default: text sampled from ``sampler`` (the teacher), two seeds."""
    source = train_data if train_data is not None else config.dataset
    eval_source = eval_data if eval_data is not None else config.eval_dataset
    seed = config.data_seed if config.data_seed is not None else 0
    load_kwargs = {"dataset_config": config.dataset_config, "split": config.dataset_split}
    if source is None:
        if sampler is None:
            raise ValueError("the default training data is sampled from the teacher: pass a dataset or a teacher")
        train = token_blocks(None, tokenizer, model=sampler, num_tokens=config.train_tokens, seq_len=config.seq_len,
                             seed=seed)
        train_name = f"{train.numel():,} tokens of chat text sampled from the teacher (seed {seed})"
    else:
        held_back = 0 if eval_source is not None else config.eval_tokens
        train = token_blocks(source, tokenizer, num_tokens=config.train_tokens + held_back, seq_len=config.seq_len,
                             min_tokens=2 * config.seq_len if held_back else None, **load_kwargs)
        train_name = str(source) if isinstance(source, (str, os.PathLike)) else (
            "token ids" if isinstance(source, torch.Tensor) else f"a {type(source).__name__} of texts")
    pad = None
    if source is None:
        pad = sampling_pad_token_id(tokenizer)
    if eval_source is not None:
        evals = token_blocks(eval_source, tokenizer, num_tokens=config.eval_tokens, seq_len=config.seq_len,
                             **load_kwargs)
        return _Data(train, evals, train_name, f"{eval_source}, {evals.numel():,} tokens", pad, None)
    if source is None:
        evals = token_blocks(None, tokenizer, model=sampler, num_tokens=config.eval_tokens, seq_len=config.seq_len,
                             seed=seed + 1)
        return _Data(train, evals, train_name,
                     f"{evals.numel():,} tokens sampled from the teacher (seed {seed + 1}, not trained on)", pad, pad)
    n_eval = min(math.ceil(config.eval_tokens / config.seq_len), train.shape[0] // 2)
    evals, train = train[-n_eval:], train[:-n_eval]
    return _Data(train, evals, f"{train_name}, {train.numel():,} tokens",
                 f"the last {evals.numel():,} tokens of {train_name}, held back from training")


def _measure(model, teacher, data: _Data, batch_size: int) -> dict:
    out = {"perplexity": perplexity(model, data.eval, batch_size, pad_token_id=data.eval_pad_token_id)}
    if teacher is not None and model is not teacher:
        out["kl"] = kl_to_reference(model, teacher, data.eval, batch_size)
    elif model is teacher:
        out["kl"] = 0.0
    return out


def _models(config: UptrainConfig, model, tokenizer, teacher):
    """Load what names refer to and decide the teacher. Returns ``(model, teacher, tokenizer, convert_here)``."""
    model, tokenizer = _load(model if model is not None else config.model, tokenizer)
    convert = False
    if config.num_key_value_heads is not None:
        convert = num_heads_of(model.config, get_arch_spec(model))[1] != config.num_key_value_heads
    teacher = teacher if teacher is not None else config.teacher
    if teacher is None and convert:
        teacher = model  # the input model is the unconverted original
    needs_teacher = "distill" in config.objective_terms or "layerwise" in config.objective_terms
    if teacher is None and _recorded_teacher(model) is not None:
        recorded = _recorded_teacher(model)
        logger.info("Loading the teacher %s (the source_model recorded in the converted config)", recorded)
        try:
            teacher = _load(recorded)[0]
        except (OSError, ValueError) as err:
            if needs_teacher:
                raise ValueError(f"could not load the recorded teacher {recorded!r} ({err}); pass --teacher") from err
            logger.warning("No teacher (%s): the held-out KL is skipped", err)
    elif isinstance(teacher, (str, os.PathLike)):
        teacher = _load(teacher)[0]
    if teacher is None and needs_teacher:
        terms = " and ".join(t for t in config.objective_terms if t in ("layerwise", "distill"))
        raise ValueError(f"the {terms} objective needs the teacher (the unconverted model): pass --teacher "
                         "(teacher=), or --num_key_value_heads to convert the model in this run")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the model's "
                         f"({model.config.vocab_size}); distillation needs the same tokenizer")
    return model, teacher, tokenizer, convert


def uptrain(model=None, tokenizer=None, teacher=None, config: UptrainConfig | None = None, train_data=None,
            eval_data=None, **kwargs) -> UptrainResult:
    """Uptrain a converted (or any) causal LM with the Trainer and write a checkpoint that loads natively.

    Args:
        model: a model object, a name/path, or ``None`` for ``config.model``. With ``num_key_value_heads`` set, it
            is the unconverted model: it is converted here and becomes the teacher.
        tokenizer: needed with a model object.
        teacher: the unconverted model (object or name/path); default: see :class:`UptrainConfig`.
        config: an :class:`UptrainConfig`; ``**kwargs`` build or override one.
        train_data, eval_data: Python data sources (texts, records, a ``datasets.Dataset``, token tensors) that
            override ``config.dataset`` / ``config.eval_dataset``.

    Returns:
        :class:`UptrainResult` with the trained model (LoRA merged), the measurements and the output folder.

    Example:
        >>> from hf_llmopt.uptrain import uptrain
        >>> result = uptrain("default", num_key_value_heads=1, objective="layerwise+distill", max_minutes=30,
        ...                  output_dir="outputs/smollm2-mqa-uptrained")  # doctest: +SKIP
        >>> result.metrics["perplexity_after"] / result.metrics["perplexity_teacher"]  # doctest: +SKIP
    """
    if config is None:
        config = UptrainConfig(**kwargs)
    elif kwargs:
        if "output_dir" in kwargs and "checkpoint_dir" not in kwargs:
            kwargs["checkpoint_dir"] = None  # derived from the new output_dir again
        config = dataclasses.replace(config, **kwargs)
    if not config.output_dir:
        raise ValueError("output_dir is required: the final model and (next to it) the Trainer checkpoints go there")
    config.device  # sets up accelerate's process group the way TrainingArguments wants it (CPU processes too)
    state = PartialState()
    if state.is_main_process:
        check_output_dir(config.output_dir, config.overwrite)
    resume = _resolve_resume(config)
    model, teacher, tokenizer, convert = _models(config, model, tokenizer, teacher)
    with state.main_process_first():
        data = prepare_data(config, tokenizer, teacher if teacher is not None else model, train_data, eval_data)

    init_dir = Path(config.checkpoint_dir) / INIT_MODEL_DIR
    if resume is not None and (init_dir / "config.json").is_file():
        logger.info("Resuming: the model training started from is read from %s", init_dir)
        student = AutoModelForCausalLM.from_pretrained(init_dir, dtype="auto")
    elif convert:
        calibration = data.train[: math.ceil(CALIBRATION_TOKENS / data.train.shape[1])]
        student = convert_to_gqa(model, config.num_key_value_heads, method=config.init,
                                 calibration_data=calibration, tokenizer=tokenizer)
    else:
        student = model
    metrics = _before_training(config, student, teacher, data, resume, state)

    if config.end_to_end_terms:
        student, history, merge_difference = _train(config, student, teacher, tokenizer, data, resume, state,
                                                    metrics.get("perplexity_teacher"))
        metrics.update(_summary(history, layerwise="layerwise" in config.objective_terms))
        if merge_difference is not None:
            metrics["lora_merge_max_relative_difference"] = merge_difference
    else:
        history = []
        if state.is_main_process:
            metrics.update({f"{k}_after": v for k, v in _measure(student, teacher, data,
                                                                 config.per_device_eval_batch_size).items()})
    if state.is_main_process:
        _save(config, student, tokenizer, teacher, getattr(student.config, CONFIG_RECORD_KEY, None), metrics, data,
              state)
    state.wait_for_everyone()
    return UptrainResult(student, tokenizer, metrics, Path(config.output_dir), history)


def _before_training(config: UptrainConfig, student, teacher, data: _Data, resume, state) -> dict:
    """Measurements before training and the layer-wise stage, once, on the main process (then shared).

    A resumed run reads the measurements back: its model is restored from the checkpoint.
    """
    checkpoints = Path(config.checkpoint_dir)
    batch = config.per_device_eval_batch_size
    metrics: dict = {"train_tokens_available": int(data.train.numel()), "eval_tokens": int(data.eval.numel())}
    if state.is_main_process and resume is None:
        if teacher is not None:
            metrics.update({f"{k}_teacher": v for k, v in _measure(teacher, teacher, data, batch).items()})
        metrics.update({f"{k}_init": v for k, v in _measure(student, teacher, data, batch).items()})
        if config.balance_scales and getattr(student.config, CONFIG_RECORD_KEY, None):
            balance_attention_scales(student)
        if "layerwise" in config.objective_terms:
            metrics.update(_layerwise(config, student, teacher, data))
            if not (config.end_to_end_terms and config.eval_on_start):  # else the Trainer's first evaluation
                metrics.update({f"{k}_layerwise": v for k, v in _measure(student, teacher, data, batch).items()})
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / BEFORE_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    elif state.is_main_process and (checkpoints / BEFORE_FILE).is_file():
        metrics.update(json.loads((checkpoints / BEFORE_FILE).read_text()))
    state.wait_for_everyone()
    broadcast_parameters(student)  # every process continues from the main process's weights
    return metrics


def _layerwise(config: UptrainConfig, student, teacher, data: _Data) -> dict:
    """The layer-wise stage: the GQA conversion's own layer-wise calibration, on the training blocks."""
    from ..gqa.calibrate import layerwise_calibrate

    spec = get_arch_spec(student)
    heads, kv = num_heads_of(student.config, spec)
    same_depth = len(get_decoder_layers(teacher, spec)) == len(get_decoder_layers(student, spec))
    if get_arch_spec(teacher) != spec or not same_depth:
        raise ValueError("the layer-wise stage needs a teacher of the same family and depth as the model")
    n_blocks = max(1, math.ceil(config.layerwise_tokens / data.train.shape[1]))
    gqa = GQAConfig(num_key_value_heads=kv, layerwise_calibration=True, layerwise_minutes=config.layerwise_minutes,
                    layerwise_lr=config.layerwise_lr, calibration_tokens=n_blocks * data.train.shape[1],
                    calibration_seq_len=data.train.shape[1],
                    layerwise_inputs="original", layerwise_batch_size=4)  # what the measured uptrain runs used
    stats = layerwise_calibrate(teacher, student, spec, gqa, calibration_data=data.train[:n_blocks])
    layers = stats.get("layerwise_layers", [])
    return {
        "layerwise_seconds": stats["layerwise_seconds"], "layerwise_steps": stats["layerwise_steps"],
        "layerwise_tokens": stats.get("layerwise_tokens"),
        "layerwise_error_before": sum(r["initial_mse"] for r in layers) / max(len(layers), 1),
        "layerwise_error_after": sum(r["final_mse"] for r in layers) / max(len(layers), 1),
    }


def broadcast_parameters(module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from process ``src`` to every other process (no-op when alone)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def _summary(history: list, layerwise: bool) -> dict:
    """Final held-out numbers and the training budget, from the Trainer's log history."""
    out = {}
    evals = [e for e in history if "eval_perplexity" in e]
    if layerwise and evals and evals[0].get("step") == 0:  # evaluated on start: right after the layer-wise stage
        out["perplexity_layerwise"] = evals[0]["eval_perplexity"]
        if "eval_kl" in evals[0]:
            out["kl_layerwise"] = evals[0]["eval_kl"]
    if evals:
        out["perplexity_after"] = evals[-1]["eval_perplexity"]
        if "eval_kl" in evals[-1]:
            out["kl_after"] = evals[-1]["eval_kl"]
    logged = [e for e in history if "train_minutes" in e]
    out["steps"] = max((e.get("step", 0) for e in history), default=0)
    out["train_minutes"] = max((e["train_minutes"] for e in logged), default=0.0)
    out["tokens_seen"] = max((e.get("tokens_seen", 0) for e in logged), default=0)
    out["eval_minutes"] = round(sum(e.get("eval_seconds", 0.0) for e in evals) / 60, 3)
    return out


def _train(config: UptrainConfig, student, teacher, tokenizer, data: _Data, resume, state,
           reference_perplexity: float | None = None):
    """End-to-end training with the Trainer. Returns (model, log history, LoRA merge difference or None)."""
    init_dir = Path(config.checkpoint_dir) / INIT_MODEL_DIR
    if config.trainable == "lora" and resume is None and config.save_strategy != "no":
        # LoRA checkpoints hold only the adapters: keep the base they apply to, so a resume can rebuild it.
        if state.is_main_process:
            shutil.rmtree(init_dir, ignore_errors=True)
            student.save_pretrained(init_dir, safe_serialization=True)
        state.wait_for_everyone()
    if config.trainable == "lora":
        student = add_lora(student, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    else:
        select_trainable(student, config.trainable)
    trainer = UptrainTrainer(
        model=student, args=config.trainer_arguments(), train_dataset=TokenBlockDataset(data.train, data.pad_token_id),
        eval_dataset=TokenBlockDataset(data.eval, data.eval_pad_token_id), data_collator=default_data_collator,
        processing_class=tokenizer, teacher=teacher, objective_terms=config.end_to_end_terms,
        distill_weight=config.distill_weight, distill_temperature=config.distill_temperature,
        eval_pad_token_id=data.eval_pad_token_id, seq_len=config.seq_len,
    )
    trainer.add_callback(TrainingClockCallback(trainer.clock, config.max_minutes, config.eval_every_minutes))
    trainer.add_callback(CurvesCallback(config.checkpoint_dir, reference_perplexity, plot=config.plot))
    trainer.train(resume_from_checkpoint=resume)
    evals = [e for e in trainer.state.log_history if "eval_perplexity" in e]
    if not evals or evals[-1].get("step") != trainer.state.global_step:
        trainer.evaluate()  # the final numbers, when the last step was not an evaluation step
    history = list(trainer.state.log_history)
    model = trainer.model
    difference = None
    if config.trainable == "lora":
        model, difference = merge_lora(model, data.eval[:2])
    model.requires_grad_(True)
    return model, history, difference


def _save(config: UptrainConfig, model, tokenizer, teacher, record, metrics, data: _Data, state) -> Path:
    curves = Path(config.checkpoint_dir) / "training_curves.png"
    curves = curves if config.end_to_end_terms else Path("/nonexistent")  # no stale curves of an earlier run
    context = card_context(config, model, teacher, record, metrics, data, state.num_processes,
                           source_name=_name(teacher) if teacher is not None else _name(model),
                           curves="training_curves.png" if curves.is_file() else None)
    full_record = {"conversion": record, "uptraining": config.to_dict() | {"objective_terms":
                   list(config.objective_terms)}, "results": metrics}
    out = save_converted(model, tokenizer, config.output_dir, card_template="uptrain.md", card_context=context,
                         record=full_record, overwrite=config.overwrite)
    # The curves are an illustration of the card, copied after the atomic rename of the checkpoint itself.
    for name in ("training_curves.png", "history.json") if config.end_to_end_terms else ():
        if (Path(config.checkpoint_dir) / name).is_file():
            shutil.copy2(Path(config.checkpoint_dir) / name, out / name)
    return out
