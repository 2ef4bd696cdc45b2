"""A safetensors writer that streams: every tensor goes to disk the moment it is added.

Safetensors puts a header with every tensor's offset before the data, so a shard's layout must
be known before its first byte. ``HFStreamWriter`` takes the full list of
``(name, shape, dtype)`` up front (export computes it by running the mapping on meta
tensors), plans the shards (``model-0000k-of-0000n.safetensors``, at most ``shard_bytes``
each, in the given order), then writes each tensor's bytes as it arrives. Memory holds one
tensor, not one shard. Files are written inside ``directory`` (use ``atomic_dir``); the
result is what ``HFWriter`` writes: one ``model.safetensors`` or shards plus
``model.safetensors.index.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mbridge.io.direct import SequentialFile
from mbridge.io.hf import INDEX, SINGLE, Entry, header, nbytes
from mbridge.io.output import writing


def plan_shards(entries: Sequence[Entry], shard_bytes: int) -> list[list[Entry]]:
    """Consecutive runs of ``entries`` of at most ``shard_bytes`` each (a larger tensor gets
    a shard of its own). ``[a:3B, b:3B, c:3B], 6`` -> ``[[a, b], [c]]``."""
    shards: list[list[Entry]] = []
    size = 0
    for entry in entries:
        n = nbytes(entry[1], entry[2])
        if not shards or (shards[-1] and size + n > shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


class HFStreamWriter:
    """Writes the planned tensors, in order, into ``directory``; ``finish()`` checks that all
    arrived and writes the index."""

    def __init__(self, directory: str | os.PathLike, entries: Sequence[Entry],
                 shard_bytes: int = 5 * 2**30):
        self.dir = Path(directory)
        self.shards = plan_shards(entries, shard_bytes)
        n = len(self.shards)
        self.names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                              for k in range(n)]
        self._order = [(k, e) for k, shard in enumerate(self.shards) for e in shard]
        self._next = 0
        self._file = None
        self.total_bytes = sum(nbytes(s, d) for _, s, d in entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"{name}: every planned tensor was already written")
        shard, (want, shape, dtype) = self._order[self._next]
        if (name, tuple(shape), dtype) != (want, tuple(tensor.shape), tensor.dtype):
            raise ValueError(f"expected {want} {list(shape)} {dtype} next, got {name} "
                             f"{list(tensor.shape)} {tensor.dtype}")
        with writing(self.dir / self.names[shard]):
            if self._file is None:
                head = header(self.shards[shard])
                size = len(head) + sum(nbytes(s, d) for _, s, d in self.shards[shard])
                self._file = SequentialFile(self.dir / self.names[shard], size_hint=size)
                self._file.write(head)
            self._file.write(tensor)
        self._next += 1
        last_of_shard = self._next == len(self._order) or self._order[self._next][0] != shard
        if last_of_shard:
            with writing(self.dir / self.names[shard]):
                self._file.close()  # flushes: may be where the disk turns out full
            self._file = None

    def finish(self) -> None:
        if self._next != len(self._order):
            missing = [e[0] for _, e in self._order[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors were never written, "
                             f"e.g. {missing[:3]}")
        if len(self.shards) == 1:
            return
        weight_map = {name: self.names[k] for k, (name, _, _) in self._order}
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        """Close an open shard file (after a failure; ``atomic_dir`` removes the files)."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # already failing: the first error is the one
                self._file.abort()
            self._file = None
