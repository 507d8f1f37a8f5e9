"""Uptraining converted models with the Hugging Face Trainer (Ainslie et al. 2023, "GQA", section 2.1).

Objectives: a layer-wise attention fit, next-token loss, distillation from the unconverted teacher. Trained: all
weights, the attention blocks, or LoRA adapters merged at the end. Runs under ``accelerate launch`` unchanged.
"""

from .api import UptrainResult, prepare_data, uptrain
from ..gqa.balance import balance_attention_scales, balance_attention_weights
from .callbacks import plot_history
from .config import OBJECTIVE_TERMS, TRAINABLE_CHOICES, UptrainConfig, parse_objective
from .trainable import add_lora, merge_lora, resolve_lora_targets, select_trainable
from .trainer import TokenBlockDataset, UptrainTrainer, distillation_loss

__all__ = [
    "UptrainConfig", "UptrainResult", "UptrainTrainer", "TokenBlockDataset", "uptrain", "prepare_data",
    "distillation_loss", "add_lora", "merge_lora", "resolve_lora_targets", "select_trainable",
    "balance_attention_scales", "balance_attention_weights", "plot_history", "parse_objective", "OBJECTIVE_TERMS",
    "TRAINABLE_CHOICES",
]
