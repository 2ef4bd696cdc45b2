"""Online conversion between an HF checkpoint and live Megatron-Core model chunks.

Import: for each mapping group, every rank reads only its TP slices of the HF tensors it
hosts, applies ``to_mcore`` locally and copies into its parameters; no collective.
Export: for each mapping group, the owning pipeline stage gathers TP shards, the pipeline
group receives them by broadcast, ``unshard`` and ``to_hf`` run on every rank, and the HF
tensors are yielded; at most one group is held beyond what the caller keeps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from mbridge.io.hf import CheckpointError, HFCheckpoint
from mbridge.mappings.core import Mapping, local_key
from mbridge.sharding import key_placement, shard_ranges, unshard
from mbridge.specs import ModelSpec, ParallelSpec, RankSpec


def _params(chunks: Sequence[torch.nn.Module]) -> list[dict[str, torch.Tensor]]:
    """Per chunk, its tensors by local-spec mcore name (Transformer Engine names mapped back)."""
    return [{local_key(k): v for k, v in chunk.state_dict(keep_vars=True).items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
            for chunk in chunks]


def _hosted(group: Mapping, spec: ModelSpec, parallel: ParallelSpec, pp_rank: int):
    """{mcore key: [(chunk, local key), ...]} for the keys of ``group`` on this stage."""
    hosted = {}
    for key in group.mcore_keys:
        places = [(v, local) for pp, v, local in
                  key_placement(key, spec.num_layers, parallel, spec.tie_embeddings)
                  if pp == pp_rank]
        if places:
            hosted[key] = places
    return hosted


def read_hf_shard(ckpt: HFCheckpoint, group: Mapping, tp: int, tp_rank: int):
    """This TP rank's slices of the HF tensors of ``group``, read lazily from disk."""
    tree = {}
    for key, layout in group.hf_layouts.items():
        if layout.dim is None:
            tree[key] = ckpt.read(key)
            continue
        shape = ckpt.shape(key)
        if len(shape) <= layout.dim:
            raise CheckpointError(f"tensor {key!r} has shape {list(shape)}; expected at least "
                                  f"{layout.dim + 1} dimensions")
        ranges, pad = shard_ranges(layout, shape[layout.dim], tp, tp_rank)
        tree[key] = ckpt.read_slices(key, layout.dim, ranges, pad)
    return tree


def load_hf(chunks, ckpt: HFCheckpoint, groups: Sequence[Mapping], spec: ModelSpec,
            parallel: ParallelSpec, rank: RankSpec) -> None:
    """Copy the HF weights this rank hosts into ``chunks``; checks every shape first."""
    params = _params(chunks)
    missing = [k for g in groups for k in g.hf_keys if k not in ckpt.keys()]
    if missing:
        raise CheckpointError(f"{ckpt.path} lacks {len(missing)} tensors the model needs, "
                              f"e.g. {missing[:3]}")
    for group in groups:
        hosted = _hosted(group, spec, parallel, rank.pp)
        if not hosted:
            continue
        hf = read_hf_shard(ckpt, group, parallel.tp, rank.tp)
        try:
            local = group.to_mcore(hf)
        except RuntimeError as e:
            raise CheckpointError(_shape_report(ckpt, group, str(e))) from None
        for key, places in hosted.items():
            for chunk, name in places:
                param = params[chunk][name]
                if param.shape != local[key].shape:
                    raise CheckpointError(_shape_report(
                        ckpt, group, f"{key} needs {list(param.shape)} on this rank, "
                        f"got {list(local[key].shape)}"))
                with torch.no_grad():
                    param.copy_(local[key])


def _shape_report(ckpt: HFCheckpoint, group: Mapping, detail: str) -> str:
    shapes = ", ".join(f"{k}: {list(ckpt.shape(k))}" for k in group.hf_keys)
    return f"misshaped tensor in {ckpt.path} ({shapes}): {detail}"


def iter_hf(chunks, groups: Sequence[Mapping], spec: ModelSpec, parallel: ParallelSpec,
            rank: RankSpec, tp_group=None, pp_group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf name, full tensor)`` for the whole model on every rank, group by group."""
    params = _params(chunks)
    for group in groups:
        full = {}
        for key, layout in group.mcore_layouts.items():
            owner, chunk, name = key_placement(key, spec.num_layers, parallel,
                                               spec.tie_embeddings)[0]
            tensor = None
            if owner == rank.pp:
                tensor = params[chunk][name].detach()
                if parallel.tp > 1 and layout.dim is not None:
                    tensor = unshard(_all_gather(tensor, tp_group, parallel.tp), layout)
                elif layout.vocab_size is not None:
                    tensor = unshard([tensor], layout)
            if parallel.pp > 1:
                tensor = _broadcast(tensor, pp_group, owner)
            full[key] = tensor
        yield from group.to_hf(full).items()


def _all_gather(tensor: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    tensor = tensor.contiguous()  # gloo sends wrong bytes for non-contiguous tensors
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor, group=group)
    return out


def _broadcast(tensor: torch.Tensor | None, group, owner: int) -> torch.Tensor:
    src = dist.get_global_rank(group, owner)
    meta = [None if tensor is None else (tuple(tensor.shape), tensor.dtype)]
    dist.broadcast_object_list(meta, src=src, group=group)
    shape, dtype = meta[0]
    if tensor is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tensor = torch.empty(shape, dtype=dtype, device=device)
    else:
        tensor = tensor.contiguous()
    dist.broadcast(tensor, src=src, group=group)
    return tensor
