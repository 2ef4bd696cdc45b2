"""Packed sequences as pure functions: first-fit bins of documents, and the per-document
boundaries (``seq_lengths``, ``cu_seqlens``) and positions that keep attention and rotary
positions inside each document.

A document is one SFT sample already shifted for next-token prediction: ``inputs``,
``labels`` and ``loss_mask`` of one length. A packed sample concatenates documents and
records their lengths; padding it to the training length adds one more segment of pad
tokens (no loss) so the boundaries always cover the whole row.

    bins = first_fit([5, 3, 4], capacity=8)          # [[0, 1], [2]]
    cu_seqlens([5, 3], total=8)                       # [0, 5, 8]
    cu_seqlens([4], total=8)                          # [0, 4, 8] (the pad segment)
    positions([5, 3], total=8)                        # [0..4, 0..2]
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec


class PackedSample(msgspec.Struct, frozen=True, kw_only=True):
    """Documents side by side: ``tokens``/``labels``/``loss_mask`` of ``sum(seq_lengths)``."""

    tokens: list[int]
    labels: list[int]
    loss_mask: list[int]
    seq_lengths: list[int]


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Document indices per bin: each document, in order, goes into the first bin with room
    for it (a new bin when none has). Every length must be in ``1..capacity``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"document {i} has {n} tokens; a packed sample holds 1 to "
                             f"{capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def pack(documents: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
         bins: Sequence[Sequence[int]]) -> list[PackedSample]:
    """The packed samples of ``documents`` ((inputs, labels, loss mask) each) as ``bins``
    group them."""
    out = []
    for b in bins:
        docs = [documents[i] for i in b]
        out.append(PackedSample(tokens=[t for d in docs for t in d[0]],
                                labels=[t for d in docs for t in d[1]],
                                loss_mask=[int(m) for d in docs for m in d[2]],
                                seq_lengths=[len(d[0]) for d in docs]))
    return out


def segments(seq_lengths: Sequence[int], total: int) -> list[int]:
    """The documents' lengths plus the pad segment that fills the row to ``total``."""
    used = sum(seq_lengths)
    if used > total:
        raise ValueError(f"packed documents hold {used} tokens, more than the row's {total}")
    return list(seq_lengths) + ([total - used] if used < total else [])


def cu_seqlens(seq_lengths: Sequence[int], total: int) -> list[int]:
    """Cumulative boundaries ``[0, l0, l0 + l1, ..., total]`` (Megatron-Core's
    ``PackedSeqParams.cu_seqlens_q``), the pad segment included."""
    out = [0]
    for n in segments(seq_lengths, total):
        out.append(out[-1] + n)
    return out


def positions(seq_lengths: Sequence[int], total: int) -> list[int]:
    """Position ids restarting at 0 in every segment."""
    return [p for n in segments(seq_lengths, total) for p in range(n)]


__all__ = ["PackedSample", "cu_seqlens", "first_fit", "pack", "positions", "segments"]
