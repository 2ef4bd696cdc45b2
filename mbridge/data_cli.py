"""``mbridge data preprocess``: JSONL text -> a Megatron-Core indexed dataset
(``PREFIX.bin`` + ``PREFIX.idx``) tokenized with an HF tokenizer, ready for
``data.blend=[PREFIX]`` in a training run.

    mbridge data preprocess --input corpus.jsonl --tokenizer HF_TOKENIZER_DIR \\
        --output-prefix data/corpus_text_document [--json-key text] [--append-eod]

One document per line: ``{"text": "..."}``. Token ids are stored in the smallest dtype that
holds the vocabulary. Both files are written under temporary names beside the target and
renamed into place only when the whole input is done (the .idx last), so a failed run leaves
nothing that looks finished. Exit codes: 0 success, 2 bad input (nothing written).
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


class PreprocessError(ValueError):
    """The input, tokenizer or output of a preprocess run is unusable."""


def _tokenizer(path: Path):
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


def run(args) -> int:
    try:
        out = preprocess(args.input, args.tokenizer, args.output_prefix, key=args.json_key,
                         append_eod=args.append_eod, progress=not args.no_progress)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {out['documents']} documents, "
          f"{out['tokens']} tokens ({out['dtype']})")
    return 0
