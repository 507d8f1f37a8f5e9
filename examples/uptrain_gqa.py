"""Uptrain a GQA/MQA-converted model with the Trainer: layer-wise fit, then distillation from the original.

The default run converts SmolLM2-135M-Instruct (offline) from 3 KV heads to 1 (MQA) with the data-aware fit, fits
each converted attention block to the original's output, distils from the original for up to 30 minutes of training
on text the original samples itself (sampled once, then cached), and writes ``outputs/smollm2-mqa-uptrained``
(safetensors, tokenizer, model card with before/after held-out perplexity and the training budget,
``training_curves.png``).

    python examples/uptrain_gqa.py
    python examples/uptrain_gqa.py --init mean --dataset /path/to/gsm8k_train.jsonl --max_minutes 10
    python examples/uptrain_gqa.py --trainable lora --lora_target_modules attention --dataset my_data.jsonl
    python examples/uptrain_gqa.py recipe.yaml --max_steps 200          # a YAML/JSON file, flags override it
    python examples/uptrain_gqa.py --resume_from_checkpoint last --overwrite   # continue an interrupted run
    accelerate launch --multi_gpu --num_processes 2 examples/uptrain_gqa.py   # 2 CPU processes without GPUs

Every ``TrainingArguments`` field is a flag too (``--learning_rate``, ``--gradient_accumulation_steps``...).
"""

import json
import sys

from accelerate import PartialState

from hf_llmopt.uptrain import uptrain
from hf_llmopt.uptrain.cli import make_parser, parse_config


def main(argv=None) -> dict:
    # The time budget ends training; the epochs only bound it on a machine fast enough to finish the data first.
    parser = make_parser(num_key_value_heads=1, objective="layerwise+distill", max_minutes=30.0, num_train_epochs=3,
                         output_dir="outputs/smollm2-mqa-uptrained")
    config = parse_config(sys.argv[1:] if argv is None else argv, parser)
    result = uptrain(config=config)
    if PartialState().is_main_process:
        print(json.dumps(result.metrics, indent=2, default=str))
    return result.metrics


if __name__ == "__main__":
    main()
