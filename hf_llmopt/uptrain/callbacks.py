"""Trainer callbacks of the uptraining recipe: a training-time budget and the loss/perplexity curves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback


def _any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true on every process when it is true on any: all processes must stop (and evaluate) at the same
    step, or DDP hangs."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1.0 if f else 0.0 for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())
    return tuple(bool(f) for f in flags)


class TrainingClockCallback(TrainerCallback):
    """Starts the trainer's :class:`~hf_llmopt.uptrain.trainer.TrainingClock` and enforces ``max_minutes``.

    The clock continues from the last ``train_minutes`` logged before a checkpoint, so a resumed run keeps one
    budget. When the budget is spent, training stops after the current step. The last step, whatever ends
    training, is logged, evaluated and saved, so that the curves and the final numbers include it.
    """

    def __init__(self, clock, max_minutes: float | None = None, eval_every_minutes: float | None = None):
        self.clock = clock
        self.max_minutes = max_minutes
        self.eval_every_minutes = eval_every_minutes
        self.next_eval_minutes = None

    def on_train_begin(self, args, state, control, **kwargs):
        logged = [e["train_minutes"] for e in state.log_history if "train_minutes" in e]
        self.clock.start(offset_seconds=60.0 * max(logged, default=0.0))
        if self.eval_every_minutes is not None:
            every = self.eval_every_minutes
            self.next_eval_minutes = (self.clock.seconds() / 60 // every + 1) * every

    def on_step_end(self, args, state, control, **kwargs):
        minutes = self.clock.seconds() / 60
        out_of_time, eval_due = _any_process(self.max_minutes is not None and minutes >= self.max_minutes,
                                             self.next_eval_minutes is not None and minutes >= self.next_eval_minutes)
        if eval_due:
            control.should_evaluate = args.eval_strategy != "no"
            while self.next_eval_minutes <= minutes:
                self.next_eval_minutes += self.eval_every_minutes
        if out_of_time:
            control.should_training_stop = True
        if out_of_time or state.global_step >= state.max_steps:
            control.should_log = True
            control.should_evaluate = args.eval_strategy != "no"
            control.should_save = args.save_strategy != "no"
        return control


class CurvesCallback(TrainerCallback):
    """At the end of training, writes ``history.json`` and ``training_curves.png`` into ``directory``."""

    def __init__(self, directory: str | os.PathLike, reference_perplexity: float | None = None, plot: bool = True):
        self.directory = Path(directory)
        self.reference_perplexity = reference_perplexity
        self.plot = plot

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "history.json").write_text(json.dumps(state.log_history, indent=1) + "\n")
        if self.plot:
            plot_history(state.log_history, self.directory / "training_curves.png", self.reference_perplexity)
        return control


def plot_history(log_history: list[dict], path: str | os.PathLike, reference_perplexity: float | None = None,
                 title: str | None = None) -> Path:
    """Training loss and held-out perplexity against steps (left) and training minutes (right), as a PNG.

    Args:
        log_history: ``TrainerState.log_history`` of an uptraining run (entries carry ``step``, ``train_minutes``,
            ``loss`` and/or ``eval_perplexity``).
        path: the PNG to write.
        reference_perplexity: drawn as a dashed line (the teacher's held-out perplexity).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in log_history if "loss" in e and "train_minutes" in e]
    evals = [e for e in log_history if "eval_perplexity" in e and "train_minutes" in e]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for col, x_key, x_label in ((0, "step", "optimizer steps"), (1, "train_minutes", "training minutes (no eval)")):
        axes[0, col].plot([e[x_key] for e in train], [e["loss"] for e in train], marker=".", label="training loss")
        axes[0, col].set_ylabel("training loss")
        axes[1, col].plot([e[x_key] for e in evals], [e["eval_perplexity"] for e in evals], marker="o",
                          label="student")
        if reference_perplexity is not None:
            axes[1, col].axhline(reference_perplexity, linestyle="--", color="gray", label="teacher")
        values = [e["eval_perplexity"] for e in evals] + ([reference_perplexity] if reference_perplexity else [])
        if values and max(values) > 3 * min(values):
            axes[1, col].set_yscale("log")  # converted models start orders of magnitude above the teacher
        axes[1, col].set_ylabel("held-out perplexity")
        axes[1, col].set_xlabel(x_label)
        for row in (0, 1):
            axes[row, col].grid(alpha=0.3)
    axes[1, 0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
