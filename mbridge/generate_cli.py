"""``mbridge generate``: greedy continuation of prompts by the Megatron-Core model, built from
an HF directory or a distributed checkpoint at the layout asked for, to check a model.

    mbridge generate --hf HF_DIR --prompt "The capital of France is" --max-new-tokens 16
    mbridge generate --mcore CKPT_DIR --chat --prompt "what is 2 + 2 ?" --tp 2 --pp 2

With ``--tp``/``--pp`` above 1 it starts ``tp x pp`` CPU (or GPU) processes itself
(``torch.distributed.run``); under torchrun it uses the world it is given. Rank 0 prints each
continuation (``--json``: one JSON line a prompt with the token ids). Exit codes: 0 success,
2 bad input (checked before any model is built).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "exit codes: 0 success, 2 bad input"
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path, metavar="DIR", help="an HF checkpoint directory")
    src.add_argument("--mcore", type=Path, metavar="DIR",
                     help="a Megatron-Core distributed checkpoint (mbridge convert import, or a "
                          "training save directory: its latest iteration)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat for several prompts)")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="HF tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--hf-config", type=Path, metavar="DIR",
                        help="HF config directory for a distributed checkpoint carrying none")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user turn of the tokenizer's chat template")
    parser.add_argument("--no-bos", action="store_true",
                        help="without --chat: do not put the tokenizer's BOS first")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="(default 32)")
    parser.add_argument("--stop-token", action="append", default=[], metavar="TOKEN",
                        help="also stop at this token (EOS always stops); repeatable")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON lines with token ids")


class GenerateError(ValueError):
    """Arguments that cannot generate."""


def _tokenizer_dir(args) -> Path:
    from mbridge.io.mcore import HF_DIR, resolve

    if args.tokenizer is not None:
        return args.tokenizer
    return args.hf if args.hf is not None else resolve(args.mcore) / HF_DIR


def check(args):
    """The tokenizer and the stop ids; GenerateError for anything unusable."""
    from transformers import AutoTokenizer

    from mbridge.io.hf import CheckpointError
    from mbridge.shell import weights
    from mbridge.specs import ParallelSpec, check_model_fits

    path = args.hf or args.mcore
    try:
        source = (weights.open_mcore_weights(path, args.hf_config) if args.hf_config
                  else weights.open_weights(path))
        check_model_fits(source.spec, ParallelSpec(tp=args.tp, pp=args.pp))
        if source.spec.num_layers < args.pp:
            raise ValueError(f"--pp {args.pp} exceeds the model's {source.spec.num_layers} "
                             "layers")
    except (CheckpointError, ValueError, NotImplementedError) as e:
        raise GenerateError(f"{path}: {e}") from None
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    tok_dir = _tokenizer_dir(args)
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:  # transformers raises OSError, ValueError, ... by case
        raise GenerateError(f"cannot load an HF tokenizer from {tok_dir}: {e} (pass "
                            "--tokenizer DIR)") from None
    if args.chat and not tok.chat_template:
        raise GenerateError(f"--chat: the tokenizer in {tok_dir} has no chat template")
    stop = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for t in args.stop_token:
        i = tok.convert_tokens_to_ids(t)
        if i is None or i == tok.unk_token_id:
            raise GenerateError(f"--stop-token {t!r} is not a token of the tokenizer")
        stop.append(i)
    return tok, stop


def _relaunch(argv: list[str], nproc: int) -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "mbridge", "generate",
           *argv]
    return subprocess.run(cmd, env=env).returncode


def _argv(args) -> list[str]:
    out = ["--hf", str(args.hf)] if args.hf else ["--mcore", str(args.mcore)]
    for flag in ("tokenizer", "hf_config"):
        if getattr(args, flag) is not None:
            out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for p in args.prompt:
        out += ["--prompt", p]
    for t in args.stop_token:
        out += ["--stop-token", t]
    out += ["--max-new-tokens", str(args.max_new_tokens), "--tp", str(args.tp),
            "--pp", str(args.pp)]
    return out + [f"--{f.replace('_', '-')}" for f in ("chat", "no_bos", "json")
                  if getattr(args, f)]


def run(args) -> int:
    try:
        tok, stop = check(args)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world == 0 and args.tp * args.pp > 1:
        return _relaunch(_argv(args), args.tp * args.pp)
    import warnings

    import torch.distributed as tdist

    from mbridge.shell.generate import greedy, load, prompt_ids

    warnings.filterwarnings("ignore")
    chunks, spec, parallel = load(args.hf or args.mcore, tp=args.tp, pp=args.pp,
                                  hf_config=args.hf_config)
    first = tdist.get_rank() == 0
    for text in args.prompt:
        ids = prompt_ids(tok, text, chat=args.chat, bos=not args.no_bos)
        new = greedy(chunks, ids, spec=spec, parallel=parallel,
                     max_new_tokens=args.max_new_tokens, stop=stop)
        answer = tok.decode(new, skip_special_tokens=True)
        if first and args.json:
            print(json.dumps({"prompt": text, "prompt_ids": ids, "ids": new, "text": answer}),
                  flush=True)
        elif first:
            print(f"{text}{' ' if not args.chat else ' -> '}{answer}", flush=True)
    return 0
