"""SFT datasets from ``data.dataset_root``: JSONL records -> tokens and loss masks through an
HF tokenizer, by the pure rules of ``mbridge.train.sft``.

``training.jsonl`` is required; ``validation.jsonl`` and ``test.jsonl`` are read when present.
Every rank tokenizes the same files the same way (deterministic, no shuffling: order the
file as you want it read), so a resumed run reads what an uninterrupted one reads.

    tok = load_tokenizer(DIR)
    tokens, mask = encode(record, tok, SFTSpec())          # one record
    train, valid, test = build_datasets(context)          # the default SFT provider
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import torch

from mbridge.train import packing, sft
from mbridge.train.config import ConfigError
from mbridge.train.packing import PackedSample
from mbridge.train.sft import SFTDataError, SFTSpec, SFTStats, TemplateError


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError, ValueError, ... by case
        raise ConfigError(f"cannot load an HF tokenizer from {path}: {e} (set data.tokenizer "
                          "to a directory holding one)") from None


def template_name(tok) -> str:
    return f"{tok.name_or_path or type(tok).__name__} chat template"


def _render(tok, messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


def _chat(messages, tok, loss_on: str) -> tuple[list[int], list[bool]]:
    template = tok.chat_template
    if not template:
        raise TemplateError(f"{tok.name_or_path}: the tokenizer has no chat template, needed "
                            "for chat records (set tokenizer.chat_template, or give "
                            "prompt/completion records)")
    if loss_on == "all":
        ids = list(tok(_render(tok, messages, False), add_special_tokens=False)["input_ids"])
        return ids, [True] * len(ids)
    has_answer = any(m["role"] == "assistant" and m["content"] for m in messages)
    if sft.has_generation_markers(template):
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, marks = list(out["input_ids"]), list(out["assistant_masks"])
        turns = sft.turn_masks_from_assistant_mask(marks)
        if has_answer and not turns:
            raise TemplateError(f"{template_name(tok)} has {{% generation %}} markers but they "
                                "marked no token of an assistant turn")
    else:
        full, spans = sft.assistant_char_spans(messages, lambda m, g: _render(tok, m, g),
                                               template_name=template_name(tok))
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        turns = sft.char_spans_to_mask(enc["offset_mapping"], spans)
    return ids, sft.chat_loss_mask(turns, len(ids), loss_on)


def encode(record: dict[str, Any], tok, spec: SFTSpec) -> tuple[list[int], list[bool]]:
    """(tokens, loss mask) of one record, before truncation."""
    fmt = sft.record_format(record, spec)
    if fmt == "prompt_completion":
        prompt, completion = sft.prompt_and_completion(record, spec)
        bos = tok.bos_token_id if spec.add_bos is not False else None
        if spec.add_bos and bos is None:
            raise SFTDataError("data.sft.add_bos=true but the tokenizer has no BOS token")
        eos = tok.eos_token_id if spec.add_eos else None
        if spec.add_eos and eos is None:
            raise SFTDataError("data.sft.add_eos=true but the tokenizer has no EOS token "
                               "(set data.sft.add_eos=false)")
        return sft.prompt_completion_sample(
            tok(prompt, add_special_tokens=False)["input_ids"],
            tok(completion, add_special_tokens=False)["input_ids"],
            bos=bos, eos=eos, loss_on=spec.loss_on)
    return _chat(sft.messages_of(record, spec, fmt), tok, spec.loss_on)


def encoded_records(path: Path, encode_one):
    """``(line number, record, tokens, mask)`` for each record of a JSONL file, blank lines
    skipped; a line that is not a JSON object, or that ``encode_one(record)`` refuses with an
    ``SFTDataError``, stops with a ``ConfigError`` naming the file and line."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise SFTDataError("not a JSON object")
                tokens, mask = encode_one(record)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from None
            except SFTDataError as e:
                raise ConfigError(f"{path}:{n}: {e}") from None
            yield n, record, tokens, mask


def read_split(path: Path, tok, spec: SFTSpec, max_inputs: int):
    """([(tokens, mask)], SFTStats) of one JSONL file; samples hold at most ``max_inputs``
    + 1 tokens (inputs and the last label)."""
    samples, stats = [], SFTStats()
    for _, _, tokens, mask in encoded_records(path, lambda r: encode(r, tok, spec)):
        tokens, mask, cut = sft.fit(tokens, mask, max_tokens=max_inputs + 1,
                                    truncation=spec.truncation)
        short = len(tokens) < spec.min_length
        no_loss = not short and not any(mask[1:])
        stats = stats.add(SFTStats(records=1, truncated=int(cut), dropped_short=int(short),
                                   dropped_no_loss=int(no_loss),
                                   samples=int(not (short or no_loss))))
        if not (short or no_loss):
            samples.append((tokens, mask))
    return samples, stats


class SFTDataset:
    """Samples as the training loop reads them: ``dataset[i]`` is one sample's unpadded
    ``tokens``, ``labels``, ``loss_mask``, ``position_ids``; ``collate`` pads a micro-batch."""

    def __init__(self, samples, *, pad_id: int, seq_length: int, multiple: int | None):
        self.samples, self.pad_id = samples, pad_id
        self.seq_length, self.multiple = seq_length, multiple

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        inputs, labels, loss_mask = sft.shift(*self.samples[i])
        return {"tokens": inputs, "labels": labels, "loss_mask": loss_mask,
                "position_ids": list(range(len(inputs)))}

    def collate(self, items) -> dict[str, torch.Tensor]:
        longest = max(len(x["tokens"]) for x in items)
        length = sft.padded_length(longest, multiple=self.multiple, seq_length=self.seq_length)
        fill = {"tokens": self.pad_id, "labels": self.pad_id, "loss_mask": 0, "position_ids": 0}
        return {k: torch.tensor([sft.pad(x[k], length, v) for x in items], dtype=torch.long)
                for k, v in fill.items()}


class PackedDataset:
    """Packed rows (``mbridge data pack`` or ``data.sft.pack``): ``dataset[i]`` is one row
    padded to ``seq_length`` with its ``cu_seqlens`` (documents, then the pad segment) and
    positions restarting in every document; ``collate`` takes one row (micro-batch size 1:
    a row already holds several documents)."""

    def __init__(self, rows: list[PackedSample], *, pad_id: int, seq_length: int):
        self.rows, self.pad_id, self.seq_length = rows, pad_id, seq_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        r, n = self.rows[i], self.seq_length
        return {"tokens": sft.pad(r.tokens, n, self.pad_id),
                "labels": sft.pad(r.labels, n, self.pad_id),
                "loss_mask": sft.pad(r.loss_mask, n, 0),
                "position_ids": packing.positions(r.seq_lengths, n),
                "cu_seqlens": packing.cu_seqlens(r.seq_lengths, n)}

    def collate(self, items) -> dict[str, torch.Tensor]:
        (item,) = items
        out = {k: torch.tensor([item[k]], dtype=torch.long) for k in
               ("tokens", "labels", "loss_mask", "position_ids")}
        out["cu_seqlens"] = torch.tensor(item["cu_seqlens"], dtype=torch.int32)
        return out


def pack_samples(samples, seq_length: int) -> list[PackedSample]:
    """First-fit rows of at most ``seq_length`` inputs from (tokens, mask) samples."""
    docs = [sft.shift(tokens, mask) for tokens, mask in samples]
    return packing.pack(docs, packing.first_fit([len(d[0]) for d in docs], seq_length))


def write_packed(path: Path, rows: list[PackedSample]) -> None:
    """One JSON row a line, written under a temporary name and renamed into place."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(msgspec.json.encode(r).decode() + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_packed(path: Path) -> list[PackedSample]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(msgspec.json.decode(line, type=PackedSample))
            except msgspec.ValidationError as e:
                raise ConfigError(f"{path}:{n}: not a packed row ({e}); write packed files "
                                  "with `mbridge data pack`") from None
            if not (len(rows[-1].tokens) == len(rows[-1].labels) == len(rows[-1].loss_mask)
                    == sum(rows[-1].seq_lengths)):
                raise ConfigError(f"{path}:{n}: tokens, labels, loss_mask and seq_lengths "
                                  "disagree in length")
    return rows


def _packed_split(path: Path, cfg, pad_id: int, context) -> PackedDataset:
    rows = read_packed(path)
    longest = max((len(r.tokens) for r in rows), default=0)
    if longest > cfg.model.seq_length:
        raise ConfigError(f"{path}: a packed row holds {longest} tokens, more than "
                          f"model.seq_length={cfg.model.seq_length}; pack again with "
                          "--seq-length or raise model.seq_length")
    context.note(f"{path.name}: {len(rows)} packed rows of "
                 f"{sum(len(r.seq_lengths) for r in rows)} documents")
    return PackedDataset(rows, pad_id=pad_id, seq_length=cfg.model.seq_length)


def build_datasets(context):
    """The default provider for ``data.dataset_root``: (train, valid or None, test or None).
    A split is read from ``{split}.packed.jsonl`` (packed rows) when present, else from
    ``{split}.jsonl`` (records; packed at load with ``data.sft.pack``)."""
    cfg = context.config
    spec, root = cfg.data.sft, Path(cfg.data.dataset_root)
    tok = load_tokenizer(context.tokenizer_dir)
    max_inputs = spec.max_length or cfg.model.seq_length
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out = []
    for split in sft.SPLITS:
        packed, path = root / f"{split}.packed.jsonl", root / f"{split}.jsonl"
        if packed.is_file():
            out.append(_packed_split(packed, cfg, pad_id, context))
            continue
        if not path.is_file():
            out.append(None)
            continue
        samples, stats = read_split(path, tok, spec, max_inputs)
        context.note(f"{path.name}: {stats.describe()}")
        if not samples:
            raise ConfigError(f"{path}: no usable sample ({stats.describe()})")
        if spec.pack:
            rows = pack_samples(samples, cfg.model.seq_length)
            context.note(f"{path.name}: packed into {len(rows)} rows")
            out.append(PackedDataset(rows, pad_id=pad_id, seq_length=cfg.model.seq_length))
        else:
            out.append(SFTDataset(samples, pad_id=pad_id, seq_length=cfg.model.seq_length,
                                  multiple=spec.pad_to_multiple_of))
    if out[1] is None and cfg.train.eval_iters:
        raise ConfigError(f"data.dataset_root={root} has no validation.jsonl but "
                          f"train.eval_iters={cfg.train.eval_iters}; add one or set "
                          "train.eval_iters=0")
    if isinstance(out[0], PackedDataset) and cfg.train.micro_batch_size != 1:
        raise ConfigError(f"packed rows need train.micro_batch_size=1 (got "
                          f"{cfg.train.micro_batch_size}): a row already holds several "
                          "documents; raise model.seq_length to put more in one")
    return tuple(out)


def check_root(cfg) -> None:
    """``data.dataset_root`` holds training.jsonl (or training.packed.jsonl)."""
    root = Path(cfg.data.dataset_root)
    if not any((root / f"training{s}.jsonl").is_file() for s in ("", ".packed")):
        raise ConfigError(f"data.dataset_root={root}: no training.jsonl there (an SFT dataset "
                          "root holds training.jsonl and optionally validation.jsonl and "
                          "test.jsonl, one JSON record a line, or their .packed.jsonl from "
                          "`mbridge data pack`; see docs/finetuning.md)")


__all__ = ["PackedDataset", "SFTDataset", "build_datasets", "check_root", "encode",
           "load_tokenizer", "pack_samples", "read_packed", "read_split", "write_packed"]
