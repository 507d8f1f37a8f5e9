"""The uptraining Trainer: next-token and/or distillation loss, held-out perplexity and KL as its evaluation.

Dimension legend: ``B`` batch, ``T`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer

from ..evaluation import kl_to_reference, perplexity

IGNORE_INDEX = -100


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed ``T^2 * KL(p_teacher || p_student)`` over positions, both softmaxes at temperature ``T``.

    The ``T^2`` factor keeps gradient magnitudes independent of the temperature (Hinton et al. 2015, section 2).

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``, same shape; no gradient flows into it.
        temperature: softmax temperature ``T > 0``.
        mask: ``(...)`` bool, the positions that count (all when ``None``).

    Returns:
        A scalar: the sum over counted positions (divide by their number for a mean).
    """
    t_log = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (..., V)
    s_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_position = (t_log.exp() * (t_log - s_log)).sum(-1)  # (...)
    if mask is not None:
        per_position = per_position[mask]
    return per_position.sum() * temperature**2


class TokenBlockDataset(Dataset):
    """``(N, T)`` token blocks as Trainer examples ``{"input_ids", "labels"}``.

    With ``pad_token_id`` (blocks of self-sampled text padded after their EOS), padding after the first pad of a
    run is not a training target; packed text has no padding and every position counts.
    """

    def __init__(self, blocks: torch.Tensor, pad_token_id: int | None = None):
        self.blocks = blocks.long()
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = self.blocks[i]
        labels = ids.clone()
        if self.pad_token_id is not None:
            is_pad = ids == self.pad_token_id
            # The first pad is the end-of-text the model should learn to emit; the ones after it are filler.
            labels[1:][is_pad[1:] & is_pad[:-1]] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


class TrainingClock:
    """Training time with evaluation excluded, continued across resumes (offset from the logged history)."""

    def __init__(self):
        self.offset = 0.0
        self.started = None
        self.excluded = 0.0

    def start(self, offset_seconds: float = 0.0) -> None:
        self.offset, self.started, self.excluded = offset_seconds, time.perf_counter(), 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def seconds(self) -> float:
        if self.started is None:
            return self.offset
        return self.offset + time.perf_counter() - self.started - self.excluded


def _all_reduce_sum(values: list[float], device) -> list[float]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()
    return values


class UptrainTrainer(Trainer):
    """A :class:`~transformers.Trainer` whose loss mixes next-token cross-entropy and distillation from a teacher.

    Args:
        teacher: the frozen reference model (``None`` when the objective has no ``distill`` term; the held-out KL
            is then skipped).
        objective_terms: end-to-end terms, a subset of ``("next_token", "distill")``.
        distill_weight: weight of the distillation term when both terms are present.
        distill_temperature: softmax temperature of distillation.
        eval_pad_token_id: pad id not scored by the held-out perplexity (self-sampled data), else ``None``.
        seq_len: tokens per block, for the ``tokens_seen`` log entry.
        *args, **kwargs: everything :class:`~transformers.Trainer` takes (``processing_class=``, not
            ``tokenizer=``). ``eval_dataset`` must be a :class:`TokenBlockDataset`.
    """

    def __init__(self, *args, teacher=None, objective_terms=("distill",), distill_weight: float = 0.5,
                 distill_temperature: float = 1.0, eval_pad_token_id: int | None = None, seq_len: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        unknown = set(objective_terms) - {"next_token", "distill"}
        if unknown or not objective_terms:
            raise ValueError(f"end-to-end objective terms must be next_token and/or distill, got {objective_terms}")
        if "distill" in objective_terms and teacher is None:
            raise ValueError("the distill objective needs the teacher (the unconverted model): pass teacher=")
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False).to(self.args.device)
        self.objective_terms = tuple(objective_terms)
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.eval_pad_token_id = eval_pad_token_id
        self.seq_len = seq_len
        self.clock = TrainingClock()
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    def _weights(self) -> dict[str, float]:
        if len(self.objective_terms) == 1:
            return {self.objective_terms[0]: 1.0}
        return {"next_token": 1.0 - self.distill_weight, "distill": self.distill_weight}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False)
        logits = outputs.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX  # (B, T-1)
        sums = {}
        if "next_token" in self.objective_terms:
            sums["next_token"] = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        if "distill" in self.objective_terms:
            with torch.no_grad():
                teacher_logits = self.teacher(**model_inputs, use_cache=False).logits[:, :-1]
            sums["distill"] = distillation_loss(logits, teacher_logits, self.distill_temperature, mask)
        total = sum(w * sums[name] for name, w in self._weights().items())

        if num_items_in_batch is not None:
            # Normalised over every target of the accumulated (and, when averaging across devices, global) batch,
            # as the Trainer does for a model's own loss: scaled for accumulation already, and multiplied back by
            # the number of processes because DDP averages gradients.
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size
            self.loss_is_scaled_for_ga = True
        else:
            loss = total / mask.sum().clamp(min=1)
            self.loss_is_scaled_for_ga = False
        if model.training:
            count = int(mask.sum())
            for name, value in sums.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value.detach())
            self._term_count += count
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add training minutes (evaluation excluded), tokens seen and the per-term losses to every log entry."""
        logs = dict(logs)
        logs["train_minutes"] = round(self.clock.seconds() / 60, 4)
        world = self.args.world_size * self.args.gradient_accumulation_steps
        logs["tokens_seen"] = int(self.state.global_step * self.args.per_device_train_batch_size * world * self.seq_len)
        if "loss" in logs and self._term_count:
            names = sorted(self._term_sums)
            totals = _all_reduce_sum([self._term_sums[n] for n in names] + [float(self._term_count)],
                                     self.args.device)
            for name, value in zip(names, totals[:-1]):
                logs[f"loss_{name}"] = value / max(totals[-1], 1.0)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Held-out perplexity and KL to the teacher, each process scoring its share of the blocks."""
        start = time.perf_counter()
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(dataset, TokenBlockDataset):
            raise TypeError("UptrainTrainer evaluates TokenBlockDataset held-out blocks")
        blocks = dataset.blocks[self.args.process_index::self.args.world_size].to(self.args.device)
        batch = self.args.per_device_eval_batch_size
        nll, scored, kl, kl_count = 0.0, 0.0, 0.0, 0.0
        if blocks.shape[0]:
            targets = blocks[:, 1:]
            scored = float(targets.numel() if self.eval_pad_token_id is None else
                           (targets != self.eval_pad_token_id).sum())
            nll = math.log(perplexity(self.model, blocks, batch, pad_token_id=self.eval_pad_token_id)) * scored
            if self.teacher is not None:
                kl_count = float(blocks.numel())
                kl = kl_to_reference(self.model, self.teacher, blocks, batch) * kl_count
        nll, scored, kl, kl_count = _all_reduce_sum([nll, scored, kl, kl_count], self.args.device)
        mean_nll = nll / max(scored, 1.0)
        metrics = {f"{metric_key_prefix}_loss": mean_nll, f"{metric_key_prefix}_perplexity": math.exp(mean_nll)}
        if kl_count:
            metrics[f"{metric_key_prefix}_kl"] = kl / kl_count
        seconds = time.perf_counter() - start
        metrics[f"{metric_key_prefix}_seconds"] = round(seconds, 2)
        self.clock.exclude(seconds)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
