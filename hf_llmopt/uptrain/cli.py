"""``hf-llmopt uptrain``: the uptraining recipe from flags or a YAML/JSON config file.

Examples::

    # convert SmolLM2-135M-Instruct to MQA, layer-wise fit + distillation for 30 minutes
    hf-llmopt uptrain --num_key_value_heads 1 --objective layerwise+distill --max_minutes 30 \\
        --output_dir outputs/smollm2-mqa-uptrained

    # an already converted checkpoint, LoRA on the attention, a jsonl dataset, 2 CPU processes (accelerate 1.x
    # starts several processes through torchrun with --multi_gpu; on a machine without GPUs they run on the CPU)
    accelerate launch --multi_gpu --num_processes 2 -m hf_llmopt.cli uptrain --model outputs/smollm2-mqa \\
        --trainable lora --lora_target_modules attention --dataset data.jsonl --output_dir outputs/x

    # everything from a file (any TrainingArguments field too); flags after it override the file
    hf-llmopt uptrain recipe.yaml --max_steps 100

    # continue an interrupted run
    hf-llmopt uptrain recipe.yaml --resume_from_checkpoint last --overwrite
"""

from __future__ import annotations

import json
import sys

COMMAND_HELP = "Uptrain a converted model through the Trainer (distillation, LoRA, accelerate)."


def make_parser(**defaults):
    """The ``HfArgumentParser`` over :class:`~hf_llmopt.uptrain.UptrainConfig` (``defaults`` replace its defaults)."""
    from transformers import HfArgumentParser

    from .config import UptrainConfig

    parser = HfArgumentParser(UptrainConfig, prog="hf-llmopt uptrain", description=COMMAND_HELP)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def parse_config(argv: list[str], parser=None):
    """An :class:`UptrainConfig` from flags, or from a leading ``.yaml``/``.yml``/``.json`` file plus flags."""
    parser = parser or make_parser()
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        with open(argv[0], encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}  # YAML is a superset of JSON
        if not isinstance(values, dict):
            raise ValueError(f"{argv[0]} must hold a mapping of UptrainConfig fields")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} in {argv[0]}; see hf-llmopt uptrain --help")
        # The file sets defaults; flags after it win.
        parser.set_defaults(**values)
        argv = argv[1:]
    (config,) = parser.parse_args_into_dataclasses(argv)
    return config


def run(config) -> dict:
    """Run the recipe and return its measurements."""
    from .api import uptrain

    result = uptrain(config=config)
    return result.metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hf-llmopt uptrain`` (the lead's ``hf_llmopt.cli`` dispatches here)."""
    from accelerate import PartialState

    config = parse_config(sys.argv[1:] if argv is None else argv)
    metrics = run(config)
    if PartialState().is_main_process:
        print(json.dumps(metrics, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
