"""Online conversion between an HF checkpoint and live Megatron-Core model chunks.

Import: for each mapping group, every rank reads only its TP slices of the HF tensors it
hosts, applies ``to_mcore`` locally and copies into its parameters; no collective. Experts
are their own groups: an expert-parallel rank reads only its experts, and expert tensors
split over the expert-tensor-parallel group (``Layout.expert``).
Export: for each mapping group, the owning pipeline stage gathers TP shards (expert-TP
shards for experts; the expert's EP rank then broadcasts it over the EP group), the pipeline
group receives them by broadcast, ``unshard`` and ``to_hf`` run on every rank, and the HF
tensors are yielded; at most one group is held beyond what the caller keeps (rows of
stacked expert tensors, ``name[e]``, are held until their tensor is complete).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from mbridge import keys
from mbridge.io.hf import CheckpointError, HFCheckpoint
from mbridge.keys import local_key, module_key, sequential_key, split_index
from mbridge.mappings.core import Mapping
from mbridge.mappings.stacked import coverage, restack, stacked_counts
from mbridge.sharding import shard, shard_ranges, unshard
from mbridge.sharding.expert import placement
from mbridge.shell.dist import Groups
from mbridge.specs import ModelSpec, ParallelSpec, RankSpec


def _params(chunks: Sequence[torch.nn.Module]) -> list[dict[str, torch.Tensor]]:
    """Per chunk, its tensors by local-spec mcore name (Transformer Engine names, TEGroupedMLP
    expert names and a vision-language model's ``language_model.`` prefix mapped back)."""
    return [{sequential_key(local_key(module_key(k))): v
             for k, v in chunk.state_dict(keep_vars=True).items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
            for chunk in chunks]


def _hosted(group: Mapping, spec: ModelSpec, parallel: ParallelSpec, rank: RankSpec):
    """{mcore key: [(chunk, local key), ...]} for the keys of ``group`` on this rank: on its
    pipeline stage and, for an expert's tensors, on its EP rank."""
    hosted = {}
    for key in group.mcore_keys:
        places = [(v, local) for pp, v, ep, local in placement(key, spec, parallel)
                  if pp == rank.pp and ep in (None, rank.ep)]
        if places:
            hosted[key] = places
    return hosted


def read_hf_shard(ckpt: HFCheckpoint, group: Mapping, tp: int, tp_rank: int,
                  etp: int = 1, etp_rank: int = 0):
    """This rank's slices of the HF tensors of ``group``, read lazily from disk: TP slices,
    or expert-TP slices for expert tensors; ``key[e]`` reads row ``e`` of a stacked tensor."""
    tree = {}
    for key, layout in group.hf_layouts.items():
        size, r = (etp, etp_rank) if layout.expert else (tp, tp_rank)
        base, row = split_index(key)
        if row is not None:  # one expert's row: read it, then its slice
            tree[key] = shard(ckpt.read(key), layout, size, r)
            continue
        if layout.dim is None:
            tree[key] = ckpt.read(key)
            continue
        shape = ckpt.shape(key)
        if len(shape) <= layout.dim:
            raise CheckpointError(f"tensor {key!r} has shape {list(shape)}; expected at least "
                                  f"{layout.dim + 1} dimensions")
        ranges, pad = shard_ranges(layout, shape[layout.dim], size, r)
        tree[key] = ckpt.read_slices(key, layout.dim, ranges, pad)
    return tree


def load_hf(chunks, ckpt: HFCheckpoint, groups: Sequence[Mapping], spec: ModelSpec,
            parallel: ParallelSpec, rank: RankSpec, part=None) -> None:
    """Copy the HF weights this rank (at ``rank`` in ``parallel``) hosts into ``chunks``;
    checks every shape first, and that every parameter came from the checkpoint.
    ``part(mcore_key) -> bool``: the chunks are one module of the model (a MIMO layout's
    encoder or language model); only the mapping groups whose keys it holds are read."""
    params = _params(chunks)
    check_coverage(ckpt, groups, spec)
    written: set[tuple[int, str]] = set()
    adopted: list[tuple[int, int]] = []
    for group in groups:
        if part is not None and not all(part(k) for k in group.mcore_keys):
            continue
        hosted = _hosted(group, spec, parallel, rank)
        if not hosted:
            continue
        hf = read_hf_shard(ckpt, group, parallel.tp, rank.tp, parallel.etp, rank.etp)
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
                _adopt_or_copy(param, local[key], adopted)
                written.add((chunk, name))
        del hf, local
        ckpt.close()  # drop the mmaps: the pages read stop counting against this process
    _check_all_loaded(params, written, ckpt)


def _adopt_or_copy(param: torch.nn.Parameter, value: torch.Tensor,
                   adopted: list[tuple[int, int]]) -> None:
    """Give ``param`` the memory of ``value`` (what the mapping produced: a tensor just read,
    passed through, or one the mapping built, such as a fused qkv) when dtype, device and
    shape match, it is contiguous and no byte of it went to another parameter; otherwise
    copy. Nothing else holds these tensors once the group is loaded, and tensors read are
    private copy-on-write maps of the file (``HFCheckpoint.mapped``): adopting costs no
    copy, and a page of a map is copied only when training first writes it."""
    ptr, size = value.data_ptr(), value.numel() * value.element_size()
    # a view (stacked experts' per-expert weights, shell/experts.py) is copied into
    if (isinstance(param, torch.nn.Parameter) and value.dtype == param.dtype
            and value.device == param.device
            and value.shape == param.shape and value.is_contiguous() and size
            and not any(ptr < end and begin < ptr + size for begin, end in adopted)):
        param.data = value
        adopted.append((ptr, ptr + size))
        return
    with torch.no_grad():
        param.copy_(value)


def _check_all_loaded(params: list[dict[str, torch.Tensor]], written: set[tuple[int, str]],
                      ckpt: HFCheckpoint) -> None:
    """Every parameter of this rank came from the checkpoint: providers build models
    without initialising them when weights are loaded, so one left out would be garbage."""
    missing = [name for c, tensors in enumerate(params) for name, v in tensors.items()
               if isinstance(v, torch.nn.Parameter) and (c, name) not in written]
    if missing:
        raise CheckpointError(f"{len(missing)} model parameters have no tensor in {ckpt.path} "
                              f"(no mapping writes them), e.g. {missing[:3]}")


def check_coverage(ckpt: HFCheckpoint, groups: Sequence[Mapping], spec: ModelSpec) -> None:
    """Raise if the mappings need tensors the checkpoint lacks, read one twice, or leave a
    tensor of one of the model's layers unread (an expert left behind); tensors outside the
    layers the model builds (e.g. multi-token-prediction layers) may stay unread."""
    cover = coverage((k for g in groups for k in g.hf_keys),
                     {k: ckpt.shape(k) for k in ckpt.keys()})
    if cover.missing:
        raise CheckpointError(f"{ckpt.path} lacks {len(cover.missing)} tensors the model "
                              f"needs, e.g. {list(cover.missing[:3])}")
    if cover.repeated:
        raise CheckpointError(f"mapping reads {list(cover.repeated[:3])} more than once")
    left = [k for k in cover.unread if keys.hf_layer_of(k) in range(spec.num_layers)
            and not k.endswith("inv_freq")]
    if left:
        raise CheckpointError(f"{ckpt.path} holds {len(left)} tensors of the model's layers "
                              f"that the {spec.architecture} mapping does not read, e.g. "
                              f"{left[:3]}; the config and the weights disagree")


def _shape_report(ckpt: HFCheckpoint, group: Mapping, detail: str) -> str:
    shapes = ", ".join(f"{k}: {list(ckpt.shape(split_index(k)[0]))}" for k in group.hf_keys)
    return f"misshaped tensor in {ckpt.path} ({shapes}): {detail}"


def iter_hf(chunks, groups: Sequence[Mapping], spec: ModelSpec,
            process_groups: Groups) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf name, full tensor)`` for the whole model on every rank of
    ``process_groups``, mapping group by mapping group."""
    counts = stacked_counts(k for g in groups for k in g.hf_keys)
    pg = process_groups
    groups_out = _iter_groups(_params(chunks), groups, spec, pg.parallel, pg.rank,
                              (pg.tp, pg.pp, pg.ep, pg.etp))
    return restack(groups_out, counts)


def _iter_groups(params, groups, spec, parallel, rank, process_groups):
    tp_group, pp_group, ep_group, etp_group = process_groups
    for group in groups:
        full = {}
        for key, layout in group.mcore_layouts.items():
            owner, chunk, ep_owner, name = placement(key, spec, parallel)[0]
            tensor = None
            if owner == rank.pp and ep_owner is not None:
                tensor = _expert_tensor(params[chunk][name].detach(), layout, parallel,
                                        rank.ep == ep_owner, etp_group, ep_group, ep_owner)
            elif owner == rank.pp:
                tensor = params[chunk][name].detach()
                if parallel.tp > 1 and layout.dim is not None:
                    tensor = unshard(_all_gather(tensor, tp_group, parallel.tp), layout)
                elif layout.vocab_size is not None:
                    tensor = unshard([tensor], layout)
            if parallel.pp > 1:
                tensor = _broadcast(tensor, pp_group, owner)
            full[key] = tensor
        yield from group.to_hf(full).items()


def _expert_tensor(local: torch.Tensor, layout, parallel: ParallelSpec, owner: bool, etp_group,
                   ep_group, ep_owner: int) -> torch.Tensor:
    """An expert's full tensor on every rank of this stage: its EP rank gathers the expert-TP
    shards, then broadcasts it over the EP group (other EP ranks hold a local expert of the
    same shape, whose full shape sizes the receive buffer)."""
    if owner:
        tensor = local
        if parallel.etp > 1 and layout.dim is not None:
            tensor = unshard(_all_gather(local, etp_group, parallel.etp), layout)
    else:
        shape = list(local.shape)
        if layout.dim is not None:
            shape[layout.dim] *= parallel.etp
        tensor = local.new_empty(shape)
    if parallel.ep > 1:
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=dist.get_global_rank(ep_group, ep_owner), group=ep_group)
    return tensor


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
