"""HF tensors that stack all experts of a layer in one stored tensor, and the coverage check.

transformers 5 keeps the experts of Qwen-MoE, Mixtral, DeepSeek-V3 and GPT-OSS as fused 3-D
parameters (``mlp.experts.gate_up_proj`` ``[num_experts, ...]``); GPT-OSS checkpoints store
them that way, the others store one tensor per expert (transformers' conversion_mapping.py
fuses them on load and splits them on save). Mappings stay per expert either way: row ``e``
of a stacked tensor is written ``key[e]`` (``"model.layers.0.mlp.experts.down_proj[3]"``),
so one expert's mapping reads one row, an expert-parallel rank reads only its rows, and on
export ``restack`` puts the rows back together.

``coverage`` checks that a list of mappings reads every stored tensor exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from mbridge.keys import index_key, split_index
from mbridge.specs import Spec


def unstack(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[n, *shape]`` -> n tensors ``[*shape]`` (contiguous)."""
    return tuple(t.contiguous() for t in tensor.unbind(0))


def stack(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``unstack``: ``stack(unstack(t)) == t``."""
    return torch.stack(list(rows), 0)


def unstack_tree(tree: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict:
    """Replace each stacked tensor named in ``keys`` by its rows ``key[e]``."""
    keys = set(keys)
    out = {}
    for key, tensor in tree.items():
        if key in keys:
            out.update({index_key(key, e): row for e, row in enumerate(unstack(tensor))})
        else:
            out[key] = tensor
    return out


def stack_tree(tree: Mapping[str, torch.Tensor]) -> dict:
    """Inverse of ``unstack_tree``: rows ``key[0..n-1]`` become ``key``."""
    return dict(restack(tree.items(), stacked_counts(tree)))


def stacked_counts(keys: Iterable[str]) -> dict[str, int]:
    """``{stored key: number of rows}`` over the indexed keys among ``keys``."""
    counts: dict[str, int] = {}
    for key in keys:
        base, index = split_index(key)
        if index is not None:
            counts[base] = max(counts.get(base, 0), index + 1)
    return counts


def restack(pairs: Iterable[tuple[str, torch.Tensor]],
            counts: Mapping[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass ``(name, tensor)`` pairs through, holding the rows ``key[e]`` of each stacked key
    until all ``counts[key]`` have come, then yield ``(key, stacked rows)``."""
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in pairs:
        base, index = split_index(name)
        if index is None:
            yield name, tensor
            continue
        rows = pending.setdefault(base, {})
        if index in rows:
            raise ValueError(f"row {name} came twice")
        rows[index] = tensor
        if len(rows) == counts[base]:
            yield base, stack([rows[e] for e in range(counts[base])])
            del pending[base]
    if pending:
        raise ValueError(f"incomplete stacked tensors: {sorted(pending)}")


class Coverage(Spec, frozen=True, kw_only=True):
    """How a set of mappings reads a checkpoint: keys it needs that are not stored (or rows
    past a stored tensor's end), stored keys nobody reads, keys or rows read more than once."""

    missing: tuple[str, ...] = ()
    unread: tuple[str, ...] = ()
    repeated: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unread or self.repeated)


def coverage(hf_keys: Iterable[str], stored: Mapping[str, Sequence[int]]) -> Coverage:
    """Compare the HF keys some mappings read (``key`` or ``key[e]``) with the stored tensors
    ``{key: shape}``: every stored tensor must be read exactly once, whole or row by row."""
    reads: dict[str, list[int | None]] = {}
    missing = []
    for key in hf_keys:
        base, index = split_index(key)
        if base not in stored or (index is not None and index >= stored[base][0]):
            missing.append(key)
        else:
            reads.setdefault(base, []).append(index)
    repeated = [k for k, r in reads.items() if len(r) != len(set(r)) or (None in r and len(r) > 1)]
    # a stored tensor is read if read whole or if every one of its rows is read
    unread = [k for k in stored if k not in reads or
              None not in reads[k] and len(set(reads[k])) < stored[k][0]]
    return Coverage(missing=tuple(missing), unread=tuple(sorted(unread)),
                    repeated=tuple(sorted(repeated)))
