"""Configuration of an uptraining run: a :class:`~transformers.TrainingArguments` with the recipe's own fields.

Every ``TrainingArguments`` field passes through unchanged (``--learning_rate``, ``--max_steps``,
``--gradient_accumulation_steps``, ``--resume_from_checkpoint`` ...), so the Python API, the command line and a
YAML/JSON config file are the same object parsed by ``HfArgumentParser``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..gqa.config import GQA_METHODS

# Terms of the objective, joined with "+": a layer-wise stage runs first, the others are summed end to end.
OBJECTIVE_TERMS = ("layerwise", "next_token", "distill")
TRAINABLE_CHOICES = ("all", "attention", "lora")
# Special values of lora_target_modules; anything else is a list of module names (or one peft regex).
LORA_TARGET_PRESETS = ("all", "attention")


def parse_objective(objective: str) -> tuple[str, ...]:
    """``"layerwise+distill"`` -> ``("layerwise", "distill")``; unknown or repeated terms are an error."""
    terms = tuple(t.strip() for t in str(objective).replace(",", "+").split("+") if t.strip())
    if not terms:
        raise ValueError(f"objective is empty; combine terms from {OBJECTIVE_TERMS} with '+', e.g. 'layerwise+distill'")
    for term in terms:
        if term not in OBJECTIVE_TERMS:
            close = difflib.get_close_matches(term, OBJECTIVE_TERMS, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown objective term {term!r} in {objective!r}.{hint} Valid terms: "
                             f"{', '.join(OBJECTIVE_TERMS)} (combine with '+', e.g. 'layerwise+distill')")
    if len(set(terms)) != len(terms):
        raise ValueError(f"objective {objective!r} repeats a term")
    return terms


@dataclass
class UptrainConfig(TrainingArguments):
    """How to uptrain a GQA/MQA-converted model (Ainslie et al. 2023, section 2.1: "uptraining").

    Model:
        model: the model to train: ``"default"`` (SmolLM2-135M-Instruct, offline), a local folder or a Hub id.
            It is converted first when ``num_key_value_heads`` is set.
        teacher: the unconverted model, for distillation and for the held-out KL. Default: the input model when this
            run converts it, else the ``source_model`` recorded in a converted checkpoint's config.
        num_key_value_heads: convert ``model`` to this many KV heads before training (``None``: train as given).
        init: the conversion method (:class:`~hf_llmopt.GQAConfig` ``method``): ``"auto"`` (default: the data-aware
            fit, calibrated on the training data), ``"mean"`` (the paper's mean pooling), ``"data_aware"``...

    Objective (``objective``, terms joined with ``+``):
        ``layerwise``: before end-to-end training, fit each converted attention block to reproduce the teacher's
            block output on calibration inputs (Adam on that block only: no full backward pass). This is the GQA
            conversion's layer-wise calibration (:mod:`hf_llmopt.gqa.calibrate`), run on the training blocks.
        ``next_token``: cross-entropy on the training text.
        ``distill``: KL(teacher || student) of the next-token distributions at ``distill_temperature``, on the same
            batches (Hinton et al. 2015); the teacher is frozen.
        With both end-to-end terms the loss is ``(1 - distill_weight) * next_token + distill_weight * distill``.

    Before any training, a converted model's attention scales are rebalanced (``balance_scales``, exact; see
    :mod:`hf_llmopt.uptrain.balance`): a closed-form conversion can leave pairs of factors so unequal that Adam
    diverges.

    What is trained (``trainable``): only the ``attention`` blocks (default: what the conversion changed; on
        SmolLM2-135M at 3 -> 1 KV heads its distillation curve was steady where training ``all`` weights jumped
        back up between evaluations), ``all`` weights, or ``lora`` adapters (PEFT) merged into the weights at the
        end (the merge is checked against the unmerged model).

    Data: ``dataset`` is a ``datasets`` name or a json/jsonl/txt file, chat-formatted with the tokenizer's template
        and packed into ``seq_len`` blocks; ``None`` samples text from the teacher (offline). The held-out set is
        ``eval_dataset``, else blocks held back from the training source (a different sampling seed by default).

    Budget: ``max_minutes`` stops training after that much training time (evaluation excluded); the Trainer's own
        ``max_steps`` / ``num_train_epochs`` apply too. Held-out evaluation runs every ``eval_steps`` and, with
        ``eval_every_minutes``, every that many minutes of training time.

    The final model goes to ``output_dir`` (written atomically with its model card); Trainer checkpoints go to
    ``checkpoint_dir`` (default ``<output_dir>.checkpoints``), where ``resume_from_checkpoint="last"`` finds them.
    """

    # --- model
    model: str = field(default="default", metadata={"help": "Model to train: 'default' (SmolLM2-135M-Instruct, "
                                                            "offline), a local folder or a Hub id."})
    teacher: str | None = field(default=None, metadata={
        "help": "The unconverted model (distillation, held-out KL). Default: the input model when "
                "--num_key_value_heads converts it here, else the source_model recorded in its config."})
    num_key_value_heads: int | None = field(default=None, metadata={
        "help": "Convert the model to this many KV heads before training (1 = MQA)."})
    init: str = field(default="auto", metadata={
        "help": f"Conversion method, one of {GQA_METHODS} ('auto': the data-aware fit, calibrated on the training "
                "data)."})
    # --- objective
    objective: str = field(default="layerwise+distill", metadata={
        "help": f"Terms joined with '+', from {OBJECTIVE_TERMS}, e.g. 'layerwise+distill' or 'next_token'."})
    distill_weight: float = field(default=0.5, metadata={
        "help": "Weight of the distillation term when combined with next_token."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of distillation."})
    layerwise_minutes: float = field(default=2.0, metadata={"help": "Budget of the layer-wise stage (minutes)."})
    layerwise_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the layer-wise stage."})
    layerwise_tokens: int = field(default=4096, metadata={"help": "Calibration tokens of the layer-wise stage."})
    balance_scales: bool = field(default=True, metadata={
        "help": "Before training a converted model, equalise the scales of each (query, key) and (value, output) "
                "pair of its attention: the function is unchanged, gradient steps become stable."})
    # --- what is trained
    trainable: str = field(default="attention", metadata={
        "help": f"One of {TRAINABLE_CHOICES}. 'attention' (default) trains only what the conversion changed."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "LoRA targets: 'all' (every projection in the architecture table, the default), 'attention', or "
                "module names."})
    # --- data
    dataset: str | None = field(default=None, metadata={
        "help": "Training data: a datasets name or a json/jsonl/txt file. Default: text sampled from the teacher."})
    dataset_config: str | None = field(default=None, metadata={"help": "datasets configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "datasets split."})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "Held-out data (same forms). Default: held back from the training source."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training/evaluation block."})
    train_tokens: int = field(default=65536, metadata={"help": "Training tokens to prepare (one epoch's worth)."})
    eval_tokens: int = field(default=4096, metadata={"help": "Held-out tokens evaluated periodically."})
    # --- budget and outputs
    max_minutes: float | None = field(default=None, metadata={
        "help": "Stop end-to-end training after this many minutes of training time (evaluation excluded)."})
    eval_every_minutes: float | None = field(default=None, metadata={
        "help": "Also evaluate every N minutes of training time (curves against time, whatever the step speed)."})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "Trainer checkpoints and logs. Default: <output_dir>.checkpoints."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    plot: bool = field(default=True, metadata={"help": "Write training_curves.png (loss and held-out perplexity)."})

    # TrainingArguments defaults that suit short CPU uptraining runs (all still overridable).
    output_dir: str | None = field(default="outputs/uptrained", metadata={"help": "Where the final model goes."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={
        "help": "Learning-rate schedule; a constant rate suits time-budgeted runs."})
    warmup_steps: float = field(default=2, metadata={"help": "Warm-up steps (or a ratio < 1): CPU runs take few."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Blocks per device per step."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Blocks per device per evaluation batch."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the prepared training tokens."})
    logging_steps: float = field(default=5, metadata={"help": "Log the training loss every N steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate held-out perplexity/KL."})
    eval_steps: float | None = field(default=25, metadata={"help": "Evaluate every N steps."})
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate before the first step."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin memory (GPU only)."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP unused-parameter search."})

    def __post_init__(self):
        self.objective_terms = parse_objective(self.objective)
        if self.trainable not in TRAINABLE_CHOICES:
            raise ValueError(f"trainable={self.trainable!r} is not one of {TRAINABLE_CHOICES}")
        if self.init not in GQA_METHODS:
            raise ValueError(f"init={self.init!r} is not a conversion method; choose one of {GQA_METHODS}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if min(self.layerwise_minutes, self.layerwise_lr, self.layerwise_tokens) <= 0:
            raise ValueError("layerwise_minutes, layerwise_lr and layerwise_tokens must be positive")
        if self.seq_len < 2 or self.train_tokens < self.seq_len or self.eval_tokens < self.seq_len:
            raise ValueError(f"need seq_len >= 2 and train_tokens, eval_tokens >= seq_len ({self.seq_len}); got "
                             f"train_tokens={self.train_tokens}, eval_tokens={self.eval_tokens}")
        for name in ("max_minutes", "eval_every_minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_target_modules is not None and self.trainable != "lora":
            raise ValueError("lora_target_modules is set but trainable is not 'lora'; pass --trainable lora")
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Launched as several processes (accelerate launch --multi_gpu / torchrun) on a machine without GPUs:
            # without this, accelerate sets up no process group and every process would train alone.
            self.use_cpu = True
        if self.checkpoint_dir is None and self.output_dir is not None:
            self.checkpoint_dir = str(self.output_dir).rstrip("/\\") + ".checkpoints"
        super().__post_init__()

    @property
    def end_to_end_terms(self) -> tuple[str, ...]:
        return tuple(t for t in self.objective_terms if t != "layerwise")

    def trainer_arguments(self) -> TrainingArguments:
        """Plain ``TrainingArguments`` for the Trainer: the same values, writing checkpoints to ``checkpoint_dir``."""
        import dataclasses

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        values["output_dir"] = self.checkpoint_dir
        return TrainingArguments(**values)
