"""Forward a batch through this rank's model chunks, pipeline stages included, and return the
full-vocabulary logits on every rank (for parity checks, ``verify --logits`` and inference
smoke tests; training uses Megatron-Core's schedules instead).

Chunks run in Megatron-Core's virtual-pipeline order: chunk 0 of every stage, then chunk 1,
...; activations ``[seq, batch, hidden]`` pass between stages with point-to-point sends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mbridge.shell.dist import Groups
from mbridge.shell.model import groups_of, unwrap
from mbridge.specs import ParallelSpec


def _order(parallel: ParallelSpec):
    return [(stage, chunk) for chunk in range(parallel.vpp_size) for stage in range(parallel.pp)]


@torch.no_grad()
def logits(chunks: list, input_ids: torch.Tensor, parallel: ParallelSpec, vocab_size: int,
           hidden_size: int, dtype: torch.dtype = torch.float32,
           groups: Groups | None = None, **inputs) -> torch.Tensor:
    """``[batch, seq, vocab_size]`` float32 logits of ``input_ids`` ``[batch, seq]``, on the CPU
    of every rank of the model's groups (``groups``; None: the groups the chunks were built
    on). ``inputs``: more model inputs, given to every stage (a vision-language model's
    ``pixel_values``, which its first stage reads, and Qwen2.5-VL's ``image_grid_thw``,
    from which every stage computes its rope positions)."""
    chunks = unwrap(chunks)
    groups = groups or groups_of(chunks)
    device = next(chunks[0].parameters()).device
    ids = input_ids.to(device)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    pp_rank, pp_group = groups.rank.pp, groups.pp
    hidden_shape = (ids.shape[1], ids.shape[0], hidden_size)
    order = _order(parallel)
    out = None
    for step, (stage, chunk) in enumerate(order):
        if stage != pp_rank:
            continue
        model = chunks[chunk]
        if step > 0:
            hidden = torch.empty(hidden_shape, dtype=dtype, device=device)
            dist.recv(hidden, src=dist.get_global_rank(pp_group, order[step - 1][0]),
                      group=pp_group)
            model.set_input_tensor(hidden)
        out = model(ids, pos, attention_mask=None, **{k: v.to(device) for k, v in inputs.items()})
        if step + 1 < len(order):
            dist.send(out.contiguous(), dst=dist.get_global_rank(pp_group, order[step + 1][0]),
                      group=pp_group)
    last_stage = order[-1][0]
    if pp_rank == last_stage:
        out = _gather_vocab(out, parallel.tp, groups.tp)
        out = out[..., :vocab_size].float().contiguous()
    else:
        out = None
    if parallel.pp > 1:
        shape = (ids.shape[0], ids.shape[1], vocab_size)
        out = out if out is not None else torch.empty(shape, device=device)
        dist.broadcast(out, src=dist.get_global_rank(pp_group, last_stage), group=pp_group)
    return out.cpu()


def _gather_vocab(local: torch.Tensor, tp: int, group) -> torch.Tensor:
    if tp == 1:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=-1)


def packed_seq_params(cu_seqlens: torch.Tensor, cp_group=None, device=None):
    """Megatron-Core's ``PackedSeqParams`` (``thd``) for one packed row whose documents end
    at ``cu_seqlens`` ``[documents + 1]``: rope restarts and attention stays inside each.
    Give ``cu_seqlens`` on the host and the model's ``device``: everything about the row is
    then read there, with no device-to-host sync (one per micro-batch otherwise, which
    drains the GPU's queue).

    With Transformer Engine: its kernels, the longest document as ``max_seqlen``. Without,
    the shell's kernels see one shape for every row of a length, so a compiled layer keeps
    one graph: the boundaries are padded with zero-length documents to a multiple of 32
    entries (an empty document is nothing to the shell's kernels and rope), ``max_seqlen``
    is the static bound ``t + 1`` (the rope tables then cover every position; ``t`` itself
    would read, to Megatron-Core's ``thd`` rope, as positions running on across documents),
    ``params.max_document`` bounds the longest document for the flash kernel (a power of
    two), and where the shell attends through FlexAttention the row's block mask is built
    here, outside any compiled region, as ``params.block_mask``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from mbridge.shell.fast_layers import document_block_mask, install_thd_rope, packed_kernel
    from mbridge.shell.model import have_te

    install_thd_rope()
    host = cu_seqlens.to("cpu", torch.int32)  # a no-op for a host tensor
    device = device if device is not None else cu_seqlens.device
    te = have_te()
    t = int(host[-1])
    lengths = (host[1:] - host[:-1]).long()
    real = int(lengths.max()) if lengths.numel() else 0
    longest = real if te else t + 1
    n = host.numel()
    if not te and n % PACKED_BOUNDARIES:
        host = torch.cat([host, host[-1:].expand(PACKED_BOUNDARIES - n % PACKED_BOUNDARIES)])
    cu = host.contiguous().to(device, non_blocking=True)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest, cp_group=cp_group)
    if te:
        return params
    # a bound on the longest document for the flash kernel: a power of two (so a compiled
    # layer sees few values), at least min(t, 1024); the kernel's grid grows with it, and t
    # where documents are short wastes most of it on empty blocks
    params.max_document = min(t, max(1024, 1 << max(real - 1, 0).bit_length()))
    if packed_kernel(torch.device(device)) == "flex":
        doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=t)
        params.block_mask = document_block_mask(doc.to(device, non_blocking=True))
    return params


PACKED_BOUNDARIES = 32  # cu_seqlens padded to a multiple of this many entries (no TE)
