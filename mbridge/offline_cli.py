"""``mbridge convert``: offline conversion between HF safetensors and a Megatron-Core
distributed checkpoint (torch_dist), streaming one layer at a time with no model instantiated,
no process group and no GPU (the library: ``mbridge/offline.py``).

    mbridge convert import --hf HF_DIR --out MCORE_DIR [--dtype bfloat16]
    mbridge convert export --mcore MCORE_DIR --out HF_DIR [--shard-size 5GB]
    mbridge convert verify --hf HF_DIR --mcore MCORE_DIR [--logits]

Outputs are written to a hidden temporary directory beside the target and renamed into place
only when complete; the input is only read. Exit codes: 0 success, 1 verify found a
difference, 2 bad input or failure, 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM);
on 2 and 128 + N nothing is left under the output name.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

EPILOG = ("exit codes: 0 success, 1 verify found a difference, 2 bad input (no output "
          "written), 130 / 143 stopped by Ctrl-C / SIGTERM (no output written)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _sub(sub, "import", "HF safetensors directory -> Megatron-Core distributed checkpoint "
             "(global shapes: loads at any TP/PP/VPP); carries config, tokenizer and "
             "generation files under hf/")
    p.add_argument("--hf", type=Path, required=True, metavar="HF_DIR",
                   help="HF model directory: config.json + *.safetensors (+ index json)")
    p.add_argument("--out", type=Path, required=True, metavar="MCORE_DIR",
                   help="distributed checkpoint directory to create")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast tensors to this dtype (default: keep the HF dtypes)")
    _common(p)

    p = _sub(sub, "export", "Megatron-Core distributed checkpoint (written by import or by "
             "training) -> HF directory: sharded safetensors + index json, config.json, "
             "generation and tokenizer files; tensors keep the checkpoint's dtype")
    p.add_argument("--mcore", type=Path, required=True, metavar="MCORE_DIR",
                   help="distributed checkpoint directory (holding metadata.json), or a "
                        "training save directory (its latest_checkpointed_iteration.txt "
                        "names the iteration)")
    p.add_argument("--out", type=Path, required=True, metavar="HF_DIR",
                   help="HF directory to create")
    p.add_argument("--shard-size", default="5GB",
                   help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--hf-config", type=Path, default=None, metavar="DIR",
                   help="directory with config.json (and tokenizer files), for checkpoints "
                        "without hf/ (default: MCORE_DIR/hf)")
    _common(p)

    p = _sub(sub, "verify", "compare every tensor of an HF directory with a distributed "
             "checkpoint, bit for bit (and with --logits the fp32 logits of both models on "
             "CPU); prints a report, exit code 1 on any difference")
    p.add_argument("--hf", type=Path, required=True, metavar="HF_DIR")
    p.add_argument("--mcore", type=Path, required=True, metavar="MCORE_DIR")
    p.add_argument("--logits", action="store_true",
                   help="also compare logits of both models in fp32 on CPU (instantiates both "
                        "models: about 8 bytes per parameter)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest max |logits diff| that passes (default 1e-4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _sub(sub, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, epilog=EPILOG)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output directory if it exists (default: refuse); an "
                        "output that is, holds or lies inside an input is always refused")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class _Stop(BaseException):
    """Raised by the SIGTERM/SIGINT handler: unwinds like Ctrl-C, so ``atomic_dir`` removes
    the partial output on the way out."""


class _Signals:
    """Turns the first SIGTERM or SIGINT into ``_Stop`` and remembers it; later ones are
    ignored, so the cleanup the first started is not cut short. ``restore()`` puts back the
    handlers found, so a caller in the same process (a script, a test run) keeps its own."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {s: signal.signal(s, self._handle)
                         for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, _frame):
        self.signum = signum
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise _Stop


def run(args: argparse.Namespace) -> int:
    from mbridge.io.output import OutputExists

    signals = _Signals()
    try:
        return _dispatch(args)
    except BaseException as e:
        # a signal can surface as another error (raised inside torch.save's writer): the
        # remembered signal decides
        if signals.signum is not None:
            name = signal.Signals(signals.signum).name
            out = f"; nothing written to {args.out}" if args.action != "verify" else ""
            print(f"mbridge convert {args.action}: stopped by {name}{out}", file=sys.stderr)
            return 128 + signals.signum
        if isinstance(e, OutputExists):
            message = e.message("--overwrite")
        elif isinstance(e, (ValueError, NotImplementedError, FileExistsError, OSError)):
            message = str(e)
        else:
            raise
        print(f"mbridge convert {args.action}: error: {message}", file=sys.stderr)
        return 2
    finally:
        signals.restore()


def _dispatch(args: argparse.Namespace) -> int:
    from mbridge import offline, verify

    start = time.perf_counter()
    if args.action == "import":
        out = offline.import_hf(args.hf, args.out, dtype=args.dtype,
                                overwrite=args.overwrite, progress=not args.quiet)
        _done(f"imported {out['spec'].architecture}: {out['tensors']} HF tensors "
              f"({out['dtype']}) -> {args.out}", out["bytes"], start)
        if out["unused_hf_keys"]:
            print(f"note: left out {len(out['unused_hf_keys'])} HF tensors the model does "
                  f"not use: {out['unused_hf_keys'][:5]}", file=sys.stderr)
        return 0
    if args.action == "export":
        out = offline.export_hf(args.mcore, args.out, shard_size=args.shard_size,
                                hf_config=args.hf_config, overwrite=args.overwrite,
                                progress=not args.quiet)
        _done(f"exported {out['spec'].architecture}: {out['tensors']} HF tensors in "
              f"{out['shards']} shard(s) -> {args.out}", out["bytes"], start)
        return 0
    report = verify.verify(args.hf, args.mcore, logits=args.logits, atol=args.atol,
                           progress=not args.quiet)
    print(format_report(report))
    return 0 if report.passed else 1


def _done(what: str, nbytes: int, start: float) -> None:
    seconds = time.perf_counter() - start
    print(f"{what}\n  {nbytes / 2**30:.2f} GiB in {seconds:.1f}s "
          f"({nbytes / 2**20 / max(seconds, 1e-9):.0f} MiB/s)")


def format_report(report) -> str:
    """The verify report as printed."""
    ok = "PASS" if not report.mismatches and not report.problems else "FAIL"
    lines = ["mbridge convert verify"]
    lines += [f"  problem     {p}" for p in report.problems]
    if not report.problems:
        lines.append(f"  tensors     {report.identical}/{report.tensors} identical"
                     + (f", {len(report.cast)} equal after casting to the checkpoint dtype"
                        if report.cast else "") + f"  {ok}")
    lines += [f"  differs     {name}: max |diff| {diff:.3e}" for name, diff in
              report.mismatches[:20]]
    if report.unused:
        lines.append(f"  not in the model (left out by import): {len(report.unused)} HF "
                     f"tensors, e.g. {report.unused[:3]}")
    if report.logits_diff is not None:
        verdict = "PASS" if report.logits_diff <= report.atol else "FAIL"
        lines.append(f"  logits      max |diff| {report.logits_diff:.3e} "
                     f"(tolerance {report.atol:g}, fp32, CPU)  {verdict}")
    lines.append("PASS" if report.passed else "FAIL")
    return "\n".join(lines)
