"""``mbridge peft``: Hugging Face files from a LoRA/DoRA training checkpoint (one written
with a ``peft`` section in the run config), on CPU in one process.

    mbridge peft export --checkpoint SAVE_DIR --out ADAPTER_DIR   # peft's adapter files
    mbridge peft merge  --checkpoint SAVE_DIR --out HF_DIR        # base + adapters merged

The base model is the run's ``model.hf_path`` (``--base`` overrides it). Outputs appear
under their name only when complete. Exit codes: 0 success, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = "exit codes: 0 success, 2 bad input (no output written)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (
            ("export", "write the checkpoint's adapters as Hugging Face peft's "
                       "adapter_config.json + adapter_model.safetensors"),
            ("merge", "write the base HF model with the checkpoint's adapters merged in "
                      "(safetensors, config and tokenizer files)")):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        p.add_argument("--checkpoint", type=Path, required=True, metavar="DIR",
                       help="training save directory (its latest checkpoint) or one "
                            "iter_XXXXXXX directory")
        p.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="directory to create")
        p.add_argument("--base", type=Path, default=None, metavar="HF_DIR",
                       help="the base HF model (default: the run config's model.hf_path)")
        if name == "merge":
            p.add_argument("--shard-size", default="5GB",
                           help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")


def _fail(message: str) -> int:
    print(f"mbridge peft: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from mbridge import AutoBridge
    from mbridge.io.hf import CheckpointError
    from mbridge.shell import adapters, checkpoint
    from mbridge.train.config import ConfigError, adapter_spec, from_dict

    try:
        path = args.checkpoint
        if not (path / "metadata.json").is_file():
            path = checkpoint.latest(path)
            if path is None:
                return _fail(f"{args.checkpoint} holds no checkpoint; point --checkpoint at a "
                             "training save directory")
        checkpoint.check_readable(path)
        common = checkpoint.common_state(path)  # common.pt (0.16) or in the .distcp (0.19)
        cfg = from_dict(common.get("run_config") or {})
        if cfg.peft is None:
            return _fail(f"{path} is not a LoRA/DoRA checkpoint (its run config has no peft "
                         "section); use `mbridge convert export` for whole models")
        base = args.base or (Path(cfg.model.hf_path) if cfg.model.hf_path else None)
        if base is None:
            return _fail("the run trained from model.spec, not an HF model; pass --base HF_DIR")
        bridge = AutoBridge.from_hf_pretrained(base)
        provider = bridge.to_megatron_provider()
        provider.finalize()
        spec = adapter_spec(cfg.peft)
        print(f"loading {base} and the {spec.scheme} adapters of {path}", file=sys.stderr)
        model = provider.provide_distributed_model(
            pre_wrap_hook=lambda chunks: adapters.apply(chunks, spec, bridge.spec))
        checkpoint.load_adapters(path, model)
        if args.action == "export":
            bridge.save_hf_adapter(model, args.out)
        else:
            bridge.save_hf_pretrained(model, args.out, merge_adapters=True,
                                      shard_size=args.shard_size)
    except (CheckpointError, ConfigError, ValueError, NotImplementedError) as e:
        return _fail(str(e))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
