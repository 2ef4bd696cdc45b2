"""``mbridge data preprocess``: JSONL text -> a Megatron-Core indexed dataset
(``PREFIX.bin`` + ``PREFIX.idx``) tokenized with an HF tokenizer, ready for
``data.blend=[PREFIX]`` in a training run.

    mbridge data preprocess --input corpus.jsonl --tokenizer HF_TOKENIZER_DIR \\
        --output-prefix data/corpus_text_document [--json-key text] [--append-eod]

One document per line: ``{"text": "..."}``. Token ids are stored in the smallest dtype that
holds the vocabulary. Both files are written under temporary names beside the target and
renamed into place only when the whole input is done (the .idx last), so a failed run leaves
nothing that looks finished. Exit codes: 0 success, 2 bad input (nothing written).

``mbridge data pack``: SFT JSONL (``training.jsonl``...) -> first-fit packed rows with their
document boundaries (``training.packed.jsonl``...), for ``data.dataset_root``:

    mbridge data pack --dataset-root DATA --tokenizer HF_DIR --seq-length 4096 --output DATA
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "exit codes: 0 success, 2 bad input (nothing written)"
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("preprocess", help="JSONL text -> indexed dataset (.bin + .idx)",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--input", type=Path, required=True, help="JSONL file, one document a line")
    p.add_argument("--tokenizer", type=Path, required=True, metavar="DIR",
                   help="HF tokenizer directory (AutoTokenizer.from_pretrained)")
    p.add_argument("--output-prefix", type=Path, required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    p.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's EOS token to every document")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    k = sub.add_parser("pack", help="SFT JSONL -> packed rows with document boundaries",
                       description=PACK_HELP)
    k.add_argument("--dataset-root", type=Path, required=True, metavar="DIR",
                   help="holds training.jsonl (and validation.jsonl, test.jsonl)")
    k.add_argument("--tokenizer", type=Path, required=True, metavar="DIR",
                   help="HF tokenizer directory (the model's)")
    k.add_argument("--seq-length", type=int, required=True,
                   help="row length: the training run's model.seq_length")
    k.add_argument("--output", type=Path, required=True, metavar="DIR",
                   help="writes {split}.packed.jsonl here (may be the dataset root)")
    k.add_argument("--sft", action="append", default=[], metavar="FIELD=VALUE",
                   help="how records become samples, as the run config's data.sft "
                        "(e.g. loss_on=all, truncation=left); repeatable")


PACK_HELP = """SFT records -> packed rows: each split's samples (built as the run config's data.sft
says) are placed first-fit into rows of at most --seq-length inputs; a row keeps its
documents' lengths, so training keeps attention and positions inside each document. Train
on them with data.dataset_root=OUTPUT (train.micro_batch_size=1). Each file is written
under a temporary name and renamed into place; on bad input nothing is written."""


class PreprocessError(ValueError):
    """The input, tokenizer or output of a preprocess run is unusable."""


def _tokenizer(path: Path):
    # transformers reads a path that does not exist as a hub repo id and answers with a
    # message about repo ids; say what is wrong instead
    if not Path(path).is_dir():
        raise PreprocessError(f"tokenizer directory {path} does not exist; --tokenizer takes a "
                              "local directory holding tokenizer.json or tokenizer_config.json")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError, ValueError, ... by case
        raise PreprocessError(f"cannot load an HF tokenizer from {path}: {e}") from None


def _documents(path: Path, key: str):
    """(text or None for a blank line, bytes read) of each line; read as bytes, so the
    progress bar counts exactly the file's size and bad UTF-8 is named by line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PreprocessError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the "
                                      "line); convert the file to UTF-8") from None
            if not line.strip():
                yield None, len(raw)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreprocessError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise PreprocessError(f"{path}:{n}: no text field {key!r}; pass --json-key")
            yield record[key], len(raw)


def _indexed_dataset_builder():
    """Megatron-Core's IndexedDatasetBuilder and DType, imported without the notices its
    package prints on import where Transformer Engine and Apex are absent (a preprocess run
    uses neither)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return DType, IndexedDatasetBuilder


def preprocess(input_path: Path, tokenizer_dir: Path, prefix: Path, *, key: str = "text",
               append_eod: bool = False, progress: bool = True) -> dict:
    """Tokenize ``input_path`` into ``prefix``.bin/.idx; returns counts."""
    import numpy as np
    import torch
    from tqdm import tqdm

    DType, IndexedDatasetBuilder = _indexed_dataset_builder()

    if not input_path.is_file():
        raise PreprocessError(f"--input {input_path}: no such file")
    tok = _tokenizer(tokenizer_dir)
    eod = tok.eos_token_id
    if append_eod and eod is None:
        raise PreprocessError(f"--append-eod: the tokenizer in {tokenizer_dir} has no EOS token")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.partial-{os.getpid()}")
    dtype = DType.optimal_dtype(len(tok))
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    docs = tokens = 0
    try:
        bar = tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True,
                   disable=not progress, desc="tokenizing")
        for text, size in _documents(input_path, key):
            ids = [] if text is None else (tok(text, add_special_tokens=False)["input_ids"]
                                           + ([eod] if append_eod else []))
            if ids:
                builder.add_document(torch.from_numpy(np.asarray(ids, dtype=dtype)), [len(ids)])
                docs, tokens = docs + 1, tokens + len(ids)
            bar.update(size)
        bar.close()
        if not docs:
            raise PreprocessError(f"{input_path} holds no non-empty documents")
        builder.finalize(f"{tmp}.idx")
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
        _remove_index_cache(prefix)
    finally:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return {"documents": docs, "tokens": tokens, "dtype": np.dtype(dtype).name}


def _remove_index_cache(prefix: Path) -> None:
    """Remove the index cache Megatron-Core's GPTDataset keeps for ``prefix`` by default
    (``PREFIX/cache/GPTDataset_indices/``): it describes the files just replaced. Training
    would not read it anyway (its cache key includes the files' size and mtime,
    ``shell.data.TokenInfo``); this only frees the space."""
    import shutil

    cache = prefix / "cache" / "GPTDataset_indices"
    if cache.is_dir():
        shutil.rmtree(cache)
        for d in (cache.parent, prefix):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def _sft_spec(items: list[str]):
    import msgspec
    import yaml

    from mbridge.train.sft import SFTSpec

    fields = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise PreprocessError(f"--sft {item!r} is not FIELD=VALUE (e.g. loss_on=all)")
        fields[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    try:
        return msgspec.convert(fields, SFTSpec, strict=False)
    except msgspec.ValidationError as e:
        raise PreprocessError(f"--sft: {e} (fields: {', '.join(SFTSpec.__struct_fields__)})") \
            from None


def pack(root: Path, tokenizer_dir: Path, seq_length: int, output: Path,
         sft_items: list[str] = ()) -> dict[str, dict]:
    """Pack every split of ``root`` into ``output/{split}.packed.jsonl``; returns counts."""
    from mbridge.shell import sft as shell_sft
    from mbridge.train.config import ConfigError
    from mbridge.train.sft import SPLITS

    spec = _sft_spec(list(sft_items))
    if seq_length < 1:
        raise PreprocessError(f"--seq-length {seq_length} must be positive")
    if not (root / "training.jsonl").is_file():
        raise PreprocessError(f"--dataset-root {root}: no training.jsonl there")
    try:
        tok = shell_sft.load_tokenizer(tokenizer_dir)
        packed = {}
        for split in SPLITS:
            path = root / f"{split}.jsonl"
            if path.is_file():
                print(f"reading {path} ...", file=sys.stderr, flush=True)
                samples, stats = shell_sft.read_split(path, tok, spec,
                                                      spec.max_length or seq_length)
                packed[split] = (shell_sft.pack_samples(samples, seq_length), stats)
    except ConfigError as e:
        raise PreprocessError(str(e)) from None
    output.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, (rows, stats) in packed.items():
        shell_sft.write_packed(output / f"{split}.packed.jsonl", rows)
        used = sum(len(r.tokens) for r in rows)
        out[split] = {"documents": stats.samples, "rows": len(rows),
                      "fill": used / max(len(rows) * seq_length, 1), "stats": stats.describe()}
    return out


def run(args) -> int:
    if args.action == "pack":
        try:
            out = pack(args.dataset_root, args.tokenizer, args.seq_length, args.output,
                       args.sft)
        except PreprocessError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for split, c in out.items():
            print(f"wrote {args.output}/{split}.packed.jsonl: {c['documents']} documents in "
                  f"{c['rows']} rows of {args.seq_length} ({c['fill']:.1%} filled); "
                  f"{c['stats']}")
        return 0
    try:
        out = preprocess(args.input, args.tokenizer, args.output_prefix, key=args.json_key,
                         append_eod=args.append_eod, progress=not args.no_progress)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {out['documents']} documents, "
          f"{out['tokens']} tokens ({out['dtype']})")
    return 0
