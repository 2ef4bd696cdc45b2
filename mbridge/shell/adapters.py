"""LoRA/DoRA on live Megatron-Core chunks: add the adapters (a pre-wrap hook), freeze the
base, read and write Hugging Face peft adapter files' tensors at any layout, merge.

An adapted linear keeps its module and its weight's name; the adapter is its submodule
``adapter`` (so its tensors are ``...linear_qkv.adapter.linear_in.weight``, the names of
``mbridge.adapters.mapping``) and a forward hook adds the adapter's output to the linear's.
Tensor parallelism follows the base linear (``adapters.mapping.layouts``):

- column-parallel base: ``h = A x`` with A whole on every rank, then ``B_r h`` gives this
  rank's output rows; ``h`` passes Megatron-Core's ``copy_to_tensor_model_parallel_region``
  (identity forward, all-reduce backward) so A's gradient sums every rank's rows;
- row-parallel base: ``h = A_r x_r`` on this rank's input columns, summed over the group
  (``reduce_from_tensor_model_parallel_region``), then B whole.

DoRA scales the linear's rows by ``m / ||W + s B A||`` (a constant to autograd, as peft);
a row-parallel rank sums the squared norms of its column slice over the group first.

Experts (``explicit_expert_comm``: EP or expert-TP > 1) run differently: the token dispatcher
gives every expert-TP rank the same tokens and sums the row-parallel ranks' partial outputs
(and, backwards, the column-parallel ranks' partial input gradients) itself, so the adapter
takes no collective in its forward either: ``B_r (A x)`` on a column-parallel expert,
``B (A_r x_r)`` on a row-parallel one, each rank's share summed by the dispatcher like the
base linear's. A rank's gradient of the replicated factor (A of a column-parallel expert, B
and DoRA's magnitude of a row-parallel one) is then only its share, so it passes Megatron-
Core's ``copy_to_tensor_model_parallel_region`` over the expert-TP group (identity forward,
all-reduce backward): every expert-TP rank holds the whole gradient, as at expert-TP 1
(Megatron-Bridge #5634 is this sum missing or over the wrong group). Expert adapters are
marked ``allreduce=False``, so DDP reduces them over the expert data-parallel group at
every layout (Megatron-Core marks its expert weights so only at EP > 1: at EP=1 with
expert-TP > TP the data-parallel group would mix different experts' shards). The grouped experts
(``shell/experts.GroupedSequentialMLP``) run the per-expert loop when an expert has one.
Adapter tensors are drawn once at their global shape from a seed and the key, then
sharded, so every layout starts from the same adapter.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist

from mbridge import keys
from mbridge.adapters import (
    Adapted,
    AdapterSpec,
    dora_factor,
    fuse_fn,
    layouts,
    mapping,
    merge,
    row_norm_sq,
    selection,
    shapes,
    site_delta,
    split_fn,
)
from mbridge.adapters.merge import site_magnitude
from mbridge.sharding import shard
from mbridge.sharding.expert import placement, split_of
from mbridge.shell import convert
from mbridge.shell.dist import Groups
from mbridge.shell.model import groups_of, unwrap
from mbridge.specs import ModelSpec

Tree = dict[str, torch.Tensor]


class _Weight(torch.nn.Module):
    """A bias-free linear's weight (applied with ``F.linear``); built from a tensor, so no
    random init draws from the global generator."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)


class Part(torch.nn.Module):
    """One adapter's tensors: ``linear_in`` (A), ``linear_out`` (B), DoRA's ``magnitude``."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.linear_in = _Weight(tensors["linear_in.weight"])
        self.linear_out = _Weight(tensors["linear_out.weight"])
        if "magnitude" in tensors:
            self.magnitude = torch.nn.Parameter(tensors["magnitude"])


class SiteAdapter(torch.nn.Module):
    """The adapter of one linear: a ``Part`` per adapted part of a fused linear (submodules
    named by the part, ``linear_q``), or the tensors of one ``Part`` on itself."""

    def __init__(self, adapted: Adapted, spec: AdapterSpec, model: ModelSpec,
                 parts: dict[str | None, dict[str, torch.Tensor]], group,
                 explicit: bool = False):
        super().__init__()
        self.adapted, self.spec, self.group = adapted, spec, group
        # an expert linear whose communication the token dispatcher does (module docstring)
        self.explicit = explicit
        self.split, self.fuse = split_fn(adapted.site, model), fuse_fn(adapted.site, model)
        self.enabled = True
        self.dropout = torch.nn.Dropout(spec.dropout) if spec.dropout else torch.nn.Identity()
        # a group of one needs no region mappings (identity both ways); skipping them also
        # keeps a compiled layer in one graph (Megatron-Core's wrappers break torch.compile)
        self.tp = dist.get_world_size(group) if group is not None and dist.is_initialized() \
            else 1
        if None in parts:  # one adapter over the linear: its tensors sit here
            tensors = parts[None]
            self.linear_in = _Weight(tensors["linear_in.weight"])
            self.linear_out = _Weight(tensors["linear_out.weight"])
            if "magnitude" in tensors:
                self.magnitude = torch.nn.Parameter(tensors["magnitude"])
        else:
            for name, tensors in parts.items():
                self.add_module(name, Part(tensors))

    def parts(self) -> list[Part | None]:
        """Per part of the linear (one entry when one adapter covers it): its ``Part``."""
        if not (self.adapted.split and len(self.adapted.site.parts) > 1):
            return [self]
        return [getattr(self, p, None) for p in self.adapted.site.parts]

    def _h(self, part, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        row = self.adapted.site.parallel == "row"
        if self.explicit:  # the dispatcher sums the ranks' shares; A's gradient is summed here
            return torch.nn.functional.linear(x, part.linear_in.weight if row else
                                              self._replicated(part.linear_in.weight))
        h = torch.nn.functional.linear(x, part.linear_in.weight)
        if self.tp == 1:
            return h
        if row:
            return mappings.reduce_from_tensor_model_parallel_region(h, group=self.group)
        return mappings.copy_to_tensor_model_parallel_region(h, group=self.group)

    def _replicated(self, t: torch.Tensor) -> torch.Tensor:
        """A replicated factor of an explicit-communication expert: identity forward, its
        gradient summed over the expert-TP group backward (module docstring)."""
        from megatron.core.tensor_parallel import mappings

        if not self.explicit or self.tp == 1:
            return t
        return mappings.copy_to_tensor_model_parallel_region(t, group=self.group)

    def _out(self, part) -> torch.Tensor:
        w = part.linear_out.weight
        return self._replicated(w) if self.adapted.site.parallel == "row" else w

    def delta_out(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``s * B A x`` over the linear's (local) output rows ``[..., out]``."""
        x = self.dropout(x) if self.spec.dropout_position == "pre" else x
        parts = self.parts()
        if len(parts) == 1:
            y = torch.nn.functional.linear(self._h(parts[0], x), self._out(parts[0]))
        else:
            rows = [w.shape[0] for w in self.split(weight)]
            outs = [torch.nn.functional.linear(self._h(p, x), self._out(p))
                    if p is not None else x.new_zeros(*x.shape[:-1], n)
                    for p, n in zip(parts, rows, strict=True)]
            y = self.fuse(*(o.movedim(-1, 0) for o in outs)).movedim(0, -1)
        y = y * self.spec.scale
        return self.dropout(y) if self.spec.dropout_position == "post" else y

    def pairs(self):
        return [None if p is None else (p.linear_in.weight, p.linear_out.weight)
                for p in self.parts()]

    @torch.no_grad()
    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``s * B A`` of this rank's shard of the weight (float32)."""
        return site_delta(weight, self.pairs(), self.spec.scale, self.split, self.fuse)

    @torch.no_grad()
    def norm_sq(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """DoRA's squared row norms of ``W + delta``, summed over a row-parallel group."""
        sq = row_norm_sq(weight, delta)
        if self.adapted.site.parallel == "row" and dist.get_world_size(self.group) > 1:
            dist.all_reduce(sq, group=self.group)
        return sq

    def dora_factor(self, weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s B A||`` per local output row (gradient through ``m`` only)."""
        sq = self.norm_sq(weight, self.delta_weight(weight))
        row = self.adapted.site.parallel == "row"
        mags = [None if p is None else self._replicated(p.magnitude) if row else p.magnitude
                for p in self.parts()]
        return dora_factor(site_magnitude(sq, mags, self.split, self.fuse), sq)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = self.delta_weight(weight)
            factor = self.dora_factor(weight) if self.spec.scheme == "dora" else None
            return merge(weight, delta, factor)


def _forward_hook(module, args, output):
    adapter: SiteAdapter = module.adapter
    if not adapter.enabled:
        return output
    out, bias = output
    x = args[0]
    y = out + adapter.delta_out(x, module.weight).to(out.dtype)
    if adapter.spec.scheme == "dora":
        y = y * adapter.dora_factor(module.weight).to(out.dtype)
    return y, bias


def _init(key: str, shape, tensor: str, spec: AdapterSpec, seed: int) -> torch.Tensor:
    """A tensor's initial value at its global shape, the same on every rank and layout."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    t = torch.empty(shape)
    method = spec.lora_A_init_method if tensor == "linear_in.weight" else spec.lora_B_init_method
    if tensor == "magnitude":
        return t  # set from the base weight's row norms
    if method == "zero":
        return t.zero_()
    if method == "kaiming":
        return torch.nn.init.kaiming_uniform_(t, a=5 ** 0.5, generator=gen)
    return torch.nn.init.xavier_normal_(t, generator=gen)


def _check_linear(module, name: str) -> None:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if type(module) not in (ColumnParallelLinear, RowParallelLinear):
        raise NotImplementedError(f"{name} is a {type(module).__name__}; adapters go on "
                                  "Megatron-Core's local ColumnParallelLinear/RowParallelLinear "
                                  "(use_te=False; Transformer Engine's fused-norm linears and "
                                  "Gemma's post-norm linears are not supported yet)")
    if module.sequence_parallel:
        raise NotImplementedError("adapters with sequence_parallel=True are not supported yet")


def apply(chunks: list, adapter: AdapterSpec, spec: ModelSpec, seed: int = 0) -> list:
    """Add ``adapter`` to this rank's chunks (built on any groups) and freeze everything
    else; returns the chunks. DoRA's magnitudes start at the base rows' norms, so with
    ``lora_B_init_method="zero"`` the adapted model starts equal to the base."""
    chunks = unwrap(chunks)
    groups = groups_of(chunks)
    parallel, rank = groups.parallel, groups.rank
    for p in (p for c in chunks for p in c.parameters()):
        p.requires_grad_(False)
    from mbridge.shell.fast_layers import pass_tp_groups  # imports Megatron-Core: lazily

    pass_tp_groups(chunks)  # frozen linears too: no warning, no graph break per call
    global_shapes = shapes(adapter, spec)
    for a in selection(adapter, spec):
        places = [(c, local) for pp, c, ep, local in placement(a.module + ".weight", spec,
                                                                parallel)
                  if pp == rank.pp and ep in (None, rank.ep)]
        if not places:
            continue
        chunk, local = places[0]
        name = local.removesuffix(".weight")
        module = chunks[chunk].get_submodule(name)
        _check_linear(module, name)
        lay = layouts(a.site, fused=not a.split)
        parts = {}
        for j in (a.parts if a.split else (None,)):
            part = None if j is None else a.part(j)
            tensors = {}
            for t in ("linear_in.weight", "linear_out.weight") + (
                    ("magnitude",) if adapter.scheme == "dora" else ()):
                key = keys.adapter_key(a.module, part, t)
                full = _init(key, global_shapes[key], t, adapter, seed)
                tensors[t] = shard(full, lay[t][0], *split_of(lay[t][0], parallel, rank)).to(
                    device=module.weight.device, dtype=module.weight.dtype).contiguous()
            parts[part] = tensors
        site = SiteAdapter(a, adapter, spec, parts, module.tp_group,
                           explicit=getattr(module, "explicit_expert_comm", False))
        _mark_tensor_parallel(site, lay)
        for p in site.parameters():  # an expert's: DDP's expert buckets (expert DP group)
            p.allreduce = not a.site.expert
        module.adapter = site
        module.sharded_state_dict = partial(_sharded_state_dict, module)
        if adapter.scheme == "dora":
            _init_magnitude(site, module.weight)
        module.register_forward_hook(_forward_hook)
    return chunks


def _sharded_state_dict(module, prefix="", sharded_offsets=(), metadata=None):
    """The linear's ``sharded_state_dict`` (``tensor_parallel/layers.py``) with its adapter's
    split tensors split on their axis too (the linear's own treats every tensor but its
    weight and bias as replicated)."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    row = module.adapter.adapted.site.parallel == "row"
    axes = {"weight": 1} if row else {"weight": 0, "bias": 0}
    axes.update({f"adapter.{n}": p.partition_dim for n, p in module.adapter.named_parameters()
                 if getattr(p, "tensor_model_parallel", False)})
    out = make_sharded_tensors_for_checkpoint(
        module.state_dict(prefix="", keep_vars=True), prefix, axes, sharded_offsets,
        tp_group=module.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))
    # a fused [gate; up] adapter output holds [gate_r; up_r] per rank, as linear_fc1's weight:
    # the same factory as MLP.sharded_state_dict's, so it loads at another TP
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    singleton = (metadata or {}).get("singleton_local_shards", False)
    for n, p in module.adapter.named_parameters():
        if getattr(p, "partition_stride", 1) == 2:
            key = f"{prefix}adapter.{n}"
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets, singleton)
    return out


def _mark_tensor_parallel(site: SiteAdapter, lay) -> None:
    """The attributes Megatron-Core's gradient-norm and checkpoint code read on split
    parameters (replicated ones carry none: counted once over the TP group)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for name, p in site.named_parameters():
        own = name.split(".")[0] in ("linear_in", "linear_out", "magnitude")
        layout = lay[name if own else name.split(".", 1)[1]][0]
        if layout.dim is not None:
            set_tensor_model_parallel_attributes(p, True, layout.dim, layout.parts)


@torch.no_grad()
def _init_magnitude(site: SiteAdapter, weight: torch.Tensor) -> None:
    norm = site.norm_sq(weight, site.delta_weight(weight)).sqrt()
    parts = site.parts()
    for part, n in zip(parts, site.split(norm) if len(parts) > 1 else [norm], strict=True):
        if part is not None:
            part.magnitude.copy_(n.to(part.magnitude.dtype))


def sites_of(chunks: list) -> list[tuple[torch.nn.Module, SiteAdapter]]:
    """``(linear, its adapter)`` for every adapted linear of these chunks."""
    return [(m, m.adapter) for c in unwrap(chunks) for m in c.modules()
            if isinstance(getattr(m, "adapter", None), SiteAdapter)]


def spec_of(chunks: list) -> AdapterSpec | None:
    """The ``AdapterSpec`` the model's adapters were made with (None: no adapters), agreed
    over the world: a pipeline stage may host no adapted linear. Every rank calls it."""
    found = {a.spec for _, a in sites_of(chunks)}
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, sorted(s.to_json() for s in found))
        found = {AdapterSpec.from_json(s) for specs in every for s in specs}
    if len(found) > 1:
        raise ValueError(f"the model holds adapters of {len(found)} different specs")
    return next(iter(found), None)


def iter_adapter(chunks: list, adapter: AdapterSpec, spec: ModelSpec,
                 groups: Groups | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(peft key, full tensor)`` for every adapter tensor, on every rank (gathered over TP,
    broadcast over PP as ``convert.iter_hf`` does for weights)."""
    chunks = unwrap(chunks)
    return convert.iter_hf(chunks, mapping(adapter, spec), spec, groups or groups_of(chunks))


def load_adapter(chunks: list, tree: Tree, adapter: AdapterSpec, spec: ModelSpec) -> None:
    """Copy a peft adapter tree (full tensors) into the chunks' adapters: each rank takes its
    slices (``layouts``) and maps them locally; checks shapes and that every adapter
    parameter was written."""
    chunks = unwrap(chunks)
    groups = groups_of(chunks)
    params = convert._params(chunks)
    written = set()
    for group in mapping(adapter, spec):
        hosted = convert._hosted(group, spec, groups.parallel, groups.rank)
        if not hosted:
            continue
        missing = [k for k in group.hf_keys if k not in tree]
        if missing:
            raise ValueError(f"the adapter lacks {len(missing)} tensors the model's adapters "
                             f"need, e.g. {missing[:3]}")
        local = group.to_mcore({k: shard(tree[k], lay, *split_of(lay, groups.parallel,
                                                                    groups.rank))
                                for k, lay in group.hf_layouts.items()})
        for key, places in hosted.items():
            for chunk, name in places:
                param = params[chunk][name]
                if param.shape != local[key].shape:
                    raise ValueError(f"{key} needs {list(param.shape)} on this rank, the "
                                     f"adapter gives {list(local[key].shape)}")
                with torch.no_grad():
                    param.copy_(local[key])
                written.add((chunk, name))
    left = [n for c, ps in enumerate(params) for n in ps
            if ".adapter." in n and (c, n) not in written]
    if left:
        raise ValueError(f"{len(left)} adapter tensors of the model are not in the adapter, "
                         f"e.g. {left[:3]}")


@contextlib.contextmanager
def merged(chunks: list):
    """Within the block the adapted linears hold their merged weights and the adapters are
    off; afterwards the original weights (bit for bit) and adapters are back."""
    saved = []
    try:
        for module, adapter in sites_of(chunks):
            new = adapter.merged_weight(module.weight)
            saved.append((module, adapter, module.weight.detach().clone()))
            with torch.no_grad():
                module.weight.copy_(new)
            adapter.enabled = False
        yield chunks
    finally:
        for module, adapter, weight in saved:
            with torch.no_grad():
                module.weight.copy_(weight)
            adapter.enabled = True


def merge_and_unload(chunks: list) -> list:
    """Merge every adapter into its weight for good and remove the adapters (peft's name)."""
    for module, adapter in sites_of(chunks):
        new = adapter.merged_weight(module.weight)
        with torch.no_grad():
            module.weight.copy_(new)
        adapter.enabled = False
        del module.adapter
        module._forward_hooks = type(module._forward_hooks)(
            (k, h) for k, h in module._forward_hooks.items() if h is not _forward_hook)
    return chunks
