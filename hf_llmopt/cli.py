"""The ``hf-llmopt`` command line.

Examples::

    hf-llmopt convert-gqa default outputs/smollm2-mqa --num-key-value-heads 1 --method auto
    hf-llmopt convert-gqa ./my-llama outputs/my-llama-gqa4 --num-key-value-heads 4 --method mean
    hf-llmopt uptrain --help
"""

from __future__ import annotations

import json
import logging
import sys

COMMANDS = {
    "convert-gqa": "Convert a causal LM's attention to fewer KV heads (GQA/MQA) and write a checkpoint.",
    "uptrain": "Uptrain a converted model through the Trainer (distillation, LoRA, accelerate).",
}


def _usage() -> str:
    lines = ["usage: hf-llmopt COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<14}{text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def convert_gqa_main(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from .gqa.api import ConvertGQAArguments, convert_and_save
    from .gqa.config import GQAConfig

    parser = HfArgumentParser((ConvertGQAArguments, GQAConfig), prog="hf-llmopt convert-gqa",
                              description=COMMANDS["convert-gqa"])
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # a config file holds every flag
        loader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        args, gqa = loader(argv[0])
    else:
        # MODEL and OUTPUT_DIR may be given positionally, as in `hf-llmopt convert-gqa MODEL OUTPUT_DIR ...`.
        positional = []
        while argv and not argv[0].startswith("-") and len(positional) < 2:
            positional.append(argv.pop(0))
        argv = [f"--{name}={value}" for name, value in zip(("model", "output_dir"), positional)] + argv
        args, gqa = parser.parse_args_into_dataclasses(argv)
    results = convert_and_save(args, gqa)
    print(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "convert-gqa":
        return convert_gqa_main(rest)
    if command == "uptrain":
        from .uptrain.cli import main as uptrain_main

        return uptrain_main(rest)
    print(f"hf-llmopt: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
