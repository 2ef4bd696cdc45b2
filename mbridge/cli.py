"""``mbridge`` command line.

Hugging Face <-> Megatron-Core conversion (offline, no GPU) and the demo; training runs
through ``torchrun -m mbridge.train`` (``python -m mbridge.train --help``).

Each command lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, importing a
command's module (and so torch/megatron) only when that command runs.

Exit codes: 0 success, 1 a check failed (e.g. verify found a difference), 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mbridge.demo", "create a tiny random HF Llama, round-trip it through Megatron-Core "
                             "at TP=2 on CPU, check logits and tensors, print a report"),
    "convert": ("mbridge.offline_cli", "offline HF <-> Megatron-Core dist checkpoint conversion"),
    "data": ("mbridge.data_cli", "training data: `data preprocess` JSONL -> indexed dataset"),
    "peft": ("mbridge.peft_cli", "LoRA/DoRA training checkpoint -> Hugging Face peft adapter "
                                 "(`peft export`) or merged model (`peft merge`)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbridge", description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 success, 1 a check failed, 2 bad input")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).run(args)


if __name__ == "__main__":
    sys.exit(main())
