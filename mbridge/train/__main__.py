"""Torchrun entry: train from a recipe or a YAML/JSON run config, with dotted overrides.

    torchrun --nproc-per-node 2 -m mbridge.train --recipe tiny_llama_pretrain
    torchrun --nproc-per-node 8 -m mbridge.train --config run.yaml train.train_iters=100
    python -m mbridge.train --recipe tiny_llama_pretrain --print-config   # show, do not train

Exit codes: 0 trained, 2 bad input (config, data path, checkpoint), found before training.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from mbridge.train import recipes

    p = argparse.ArgumentParser(
        prog="python -m mbridge.train",
        description="Train a GPT model on Megatron-Core. Launch with torchrun for several "
                    "processes; a plain `python -m mbridge.train` trains on one.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", choices=sorted(recipes.RECIPES),
                     help="start from a recipe's run config")
    src.add_argument("--config", type=Path, help="a run config file (.yaml, .yml or .json)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.train_iters=100 optimizer.lr=1.0e-4")
    p.add_argument("--print-config", action="store_true",
                   help="check the resolved run config (model, plan, data, checkpoints; "
                        "not Transformer Engine or W&B), print it as YAML and exit")
    return p


def resolve_config(args):
    """The RunConfig the arguments describe (ConfigError on any problem)."""
    from mbridge.train import config, recipes

    if args.recipe:
        cfg = recipes.get(args.recipe)()
    else:
        if not args.config.is_file():
            raise config.ConfigError(f"--config {args.config}: no such file")
        fmt = "json" if args.config.suffix == ".json" else "yaml"
        cfg = config.from_text(args.config.read_text(), fmt)
    return config.apply_overrides(cfg, args.overrides)


def quiet_known_warnings() -> None:
    """Hide Megatron-Core's notices that are expected here (no TE/Apex on CPU, mock-data
    index caching, grad access on optimizer views) so the training log stays readable."""
    import logging
    import warnings

    for pattern in (".*(Apex|Transformer Engine).* not installed.*", ".*full scope is deprecated.*",
                    ".*\\.grad attribute of a Tensor that is not a leaf.*",
                    ".*torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor).*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from mbridge.io.hf import CheckpointError
    from mbridge.train.config import ConfigError

    args = build_parser().parse_args(argv)
    quiet_known_warnings()
    try:
        cfg = resolve_config(args)
        from mbridge.shell.pretrain import check, pretrain

        if args.print_config:
            world = os.environ.get("WORLD_SIZE")
            check(cfg, int(world) if world else None)  # only a config that can run
            print(cfg.to_yaml(), end="")
            return 0
        pretrain(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
