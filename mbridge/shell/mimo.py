"""``MimoRuntime``: the ``mbridge.train.step.Runtime`` protocol for a vision-language model
whose modules have their own layouts (``model.module_parallelisms``, colocated or
heterogeneous: ``mbridge.sharding.mimo``).

Each rank builds the modules it holds, on that module's own process groups
(``dist.module_groups``): the ``images`` encoder (``vlm.VisionPart``: HF's CLIP tower and
projector) and the language model (the LLaVA chunk without its encoder, fed
``image_embeddings``), each loaded from its part of the HF checkpoint and wrapped in
Megatron-Core DDP on its own data-parallel group, each with its own Megatron-Core optimizer.
A step, as the pure routes of ``mbridge.train.mimo`` say:

1. encoder ranks run the tower on their DP share of the global batch (global / encoder DP);
2. each sample's embedding goes to the language-model ranks that read it (send/recv of
   contiguous tensors; a copy when both sides are one rank);
3. the language model runs forward and backward through Megatron-Core's schedule
   (per-token loss: its gradients come out divided by the global batch's token count); with
   PP > 1 (heterogeneous) 1F1B over its own pipeline group, the embeddings into its first
   stage, the loss on its last;
4. each embedding's gradient goes back; the encoder runs backward, its gradients are summed
   over its own DP group and divided by the same token count;
5. the gradient norm is taken over every module together, and one clipped update steps
   every module's optimizer.

Checkpoints (``save_hf`` and ``shell.mimo_checkpoint``): HF files per module, plus each
rank's optimizer and RNG state for ``checkpoint.load``.

    torchrun --nproc-per-node 2 -m mbridge.train --recipe tiny_llava_finetune \\
        model.deployment_mode=heterogeneous model.module_parallelisms.language.rank_offset=1 ...
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as tdist

from mbridge import keys
from mbridge.architectures import registry
from mbridge.sharding import mimo as layout
from mbridge.shell import data, dist
from mbridge.shell.cpu_shim import cuda_as_cpu
from mbridge.shell.fast_layers import use_group_cross_entropy
from mbridge.shell.model import build_chunks, transformer_config
from mbridge.shell.runtime import DTYPES, _loss_func, freeze, megatron_optimizer
from mbridge.shell.vlm import VisionPart
from mbridge.train import mimo as plan
from mbridge.train.step import GradStats, LossSum

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1,
                "BOOL": 1}


def _nbytes(shape, dtype: str) -> int:
    n = _DTYPE_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def _is_vision(key: str) -> bool:
    """Whether an mcore key belongs to the ``images`` module (tower and projection)."""
    return key.startswith(keys.MODALITY)


class _Module:
    """One module on this rank: its DDP-wrapped model, optimizer (None when frozen) and
    groups."""

    def __init__(self, name, ddp, optimizer, groups, cfg: layout.ModuleParallelismConfig):
        self.name, self.ddp, self.optimizer, self.groups, self.cfg = (name, ddp, optimizer,
                                                                      groups, cfg)

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None


class MimoRuntime:
    """Owns every module this rank holds; implements the training Runtime protocol."""

    def __init__(self, spec, run_plan, *, model, optimizer, ddp, mixed_precision,
                 micro_batch_size, weights=None, seed: int = 0):
        self.spec, self.plan, self.mimo = spec, run_plan, run_plan.mimo
        self.model_cfg, self.optim_cfg, self.ddp_cfg = model, optimizer, ddp
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.dtype = DTYPES[mixed_precision]
        self.lm_name = self.mimo.llm_module_name
        # every rank creates every module's groups, in one order
        names = sorted(self.mimo.module_parallelisms)
        groups = {n: dist.module_groups(self.mimo, n) for n in names}
        self.rank = tdist.get_rank()
        self.modules: dict[str, _Module] = {}
        for name in layout.modules_on(self.mimo, self.rank):
            build = self._build_lm if name == self.lm_name else self._build_encoder
            self.modules[name] = build(name, groups[name], weights)
        # whether the encoder trains (then embedding gradients go back), agreed by all ranks
        flag = torch.tensor([float(self._local_encoder_trainable())], device=dist.device())
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        self.encoder_trainable = bool(flag.item())
        self.model = [m.ddp for m in self.modules.values()]  # TrainState's model
        keys_of = weights.checkpoint.keys() if hasattr(weights, "checkpoint") else ()
        self.mapping_options = registry.get(spec.architecture).options_for(keys_of)
        self.optimizer = [m.optimizer for m in self.modules.values()]

    def _local_encoder_trainable(self) -> bool:
        return any(m.trainable for n, m in self.modules.items() if n != self.lm_name)

    # ---- building -------------------------------------------------------------------------

    def _extra(self) -> dict:
        m = self.model_cfg
        return dict(calculate_per_token_loss=True, init_method_std=m.init_method_std,
                    hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout)

    def _wrap(self, name, module, config, groups, chunks_for_freeze) -> _Module:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        freeze(chunks_for_freeze, model=self.model_cfg)
        p = self.ddp_cfg
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=p.grad_reduce_in_fp32, bucket_size=p.bucket_size,
            use_distributed_optimizer=self.optim_cfg.use_distributed_optimizer)
        wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module,
                                          pg_collection=groups.collection)
        config.finalize_model_grads_func = finalize_model_grads
        trainable = any(q.requires_grad for q in module.parameters())
        with cuda_as_cpu():
            optimizer = self._optimizer([wrapped], groups) if trainable else None
        return _Module(name, wrapped, optimizer, groups, self.mimo.module_parallelisms[name])

    def _optimizer(self, chunks, groups):
        return megatron_optimizer(self.optim_cfg, self.dtype, chunks,
                                  pg_collection=groups.collection, use_gloo_process_groups=False)

    def _build_lm(self, name, groups, weights) -> _Module:
        parallel = self.plan.parallel
        (chunk,) = build_chunks(self.spec, parallel, groups.rank.pp, dtype=self.dtype,
                                device=dist.device(), pg_collection=groups.collection,
                                skip_init=weights is not None, modalities=False,
                                **self._extra())
        if weights is not None:
            weights.load([chunk], parallel, groups, part=lambda k: not _is_vision(k))
        if chunk.language_model.post_process:  # Megatron-Core's loss reads parallel_state's TP
            use_group_cross_entropy(chunk.language_model)
        return self._wrap(name, chunk, chunk.config, groups, [chunk])

    def _build_encoder(self, name, groups, weights) -> _Module:
        v = self.spec.vision
        part = VisionPart(v, self.spec.hidden_size).to(device=dist.device(),
                                                        dtype=getattr(torch, self.dtype))
        if weights is not None:
            weights.load([part], self.plan.parallel.replace(tp=groups.parallel.tp), groups,
                         part=_is_vision)
        config = transformer_config(self.spec, groups.parallel, self.dtype, **self._extra())
        return self._wrap(name, part, config, groups, [part])

    # ---- data -----------------------------------------------------------------------------

    def batch_at(self, dataset, consumed: int) -> dict:
        """This rank's share of the global batch at sample ``consumed``: per module it holds,
        what the DP-aware plan gives its DP rank (``mbridge.train.mimo``)."""
        gbs, out = self.plan.step.global_batch_size, {}
        for name, m in self.modules.items():
            dp_rank = m.groups.dp_rank
            if name == self.lm_name:
                out[name] = [{**data.collate(dataset, [consumed + s for s in mb]),
                              "_samples": list(mb)} for mb in
                             plan.lm_microbatches(gbs, self.micro_batch_size,
                                                  m.cfg.data_parallel, dp_rank)]
            else:
                samples = plan.module_samples(gbs, m.cfg.data_parallel, dp_rank)
                plan.check_module_batch(name, samples, global_batch=gbs,
                                        dp=m.cfg.data_parallel, dp_rank=dp_rank)
                out[name] = {s: data.collate(dataset, [consumed + s])["pixel_values"]
                             for s in samples}
        return out

    # ---- the Runtime protocol -------------------------------------------------------------

    def forward_backward(self, batch, *, seed: int) -> LossSum:
        return self._run(batch, seed=seed, forward_only=False)

    def _run(self, batch, *, seed: int, forward_only: bool) -> LossSum:
        from mbridge.shell.dist import set_random_seed

        for m in self.modules.values():
            set_random_seed(seed, m.groups)
            m.ddp.zero_grad_buffer()
            if m.optimizer is not None:
                m.optimizer.zero_grad()
        gbs = self.plan.step.global_batch_size
        enc = self.modules.get("images")
        feats, rows = {}, {}
        if enc is not None:  # 1. the tower on this replica's samples, one batch
            samples = sorted(batch["images"])
            pixels = torch.cat([batch["images"][s] for s in samples]).to(dist.device())
            with torch.set_grad_enabled(enc.trainable and not forward_only):
                out = enc.ddp(pixels)
            per_image = out.shape[0] // pixels.shape[0]
            counts = [batch["images"][s].shape[0] * per_image for s in samples]
            enc_out = out
            feats = dict(zip(samples, torch.split(out, counts)))
        lm = self.modules.get(self.lm_name)
        if lm is not None:  # 2. embeddings to the language model's ranks
            token = self.spec.vision.image_token_id
            for mb in batch[self.lm_name]:
                rows.update({s: int((t == token).sum()) for s, t in
                             zip(mb["_samples"], mb["tokens"])})
        hidden = self.spec.hidden_size
        received = self._exchange(plan.embedding_routes(self.mimo, "images", gbs),
                                  lambda s: feats[s].detach(),
                                  lambda s: torch.empty(rows[s], hidden, device=dist.device(),
                                                        dtype=getattr(torch, self.dtype)))
        total = torch.zeros(2, dtype=torch.float64, device=dist.device())
        grads = {}
        if lm is not None:  # 3. the language model
            loss, grads = self._run_lm(lm, batch[self.lm_name], received, forward_only)
            total += loss
        # every rank reports the global batch's loss: one replica's last stage, TP rank 0, each
        tdist.all_reduce(total)
        tokens = float(total[1])
        if self.encoder_trainable and not forward_only:  # 4. gradients back
            back = self._exchange(plan.gradient_routes(self.mimo, "images", gbs),
                                  lambda s: grads[s], lambda s: torch.empty_like(feats[s]))
            if enc is not None:
                enc_out.backward(torch.cat([back[s] for s in sorted(feats)]))
                enc.ddp.finish_grad_sync()  # summed over the encoder's DP group
                enc.ddp.scale_gradients(1.0 / max(tokens, 1.0))
        return LossSum(total=float(total[0]), tokens=int(total[1]))

    def _exchange(self, routes, value, empty) -> dict:
        """Post every transfer of ``routes`` this rank takes part in (sends of ``value(s)``,
        receives into ``empty(s)``), in the routes' order; wait; the received by sample."""
        sends, receives = plan.routes_of(routes, self.rank)
        got, ops = {}, []
        for r in sends:
            if r.dst != self.rank:
                ops.append(tdist.P2POp(tdist.isend, value(r.sample).contiguous(), r.dst))
        for r in receives:
            if r.src == self.rank:
                got[r.sample] = value(r.sample).clone()
            else:
                got[r.sample] = empty(r.sample)
                ops.append(tdist.P2POp(tdist.irecv, got[r.sample], r.src))
        if ops:
            for work in tdist.batch_isend_irecv(ops):
                work.wait()
        return got

    def _run_lm(self, lm: _Module, micro_batches, received, forward_only):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = dist.device()
        trainable_images = self.encoder_trainable and not forward_only
        first_stage = lm.groups.rank.pp == 0  # only it reads the embeddings (the routes')
        leaves = []
        data = []
        for mb in micro_batches:
            samples = mb["_samples"]
            d = {k: v.to(device) for k, v in mb.items() if k not in ("_samples", "pixel_values")}
            if first_stage:
                emb = torch.cat([received[s] for s in samples]).requires_grad_(trainable_images)
                d["image_embeddings"] = emb
                leaves.append((samples, emb))
            data.append(d)
        pp = lm.cfg.pipeline_parallel
        extra = {}
        if pp > 1:  # Megatron-Core's 1F1B over the module's own pipeline group
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            extra["p2p_communicator"] = P2PCommunicator(pp_group=lm.groups.pp,
                                                        config=lm.ddp.config)
        with cuda_as_cpu():
            outputs = get_forward_backward_func(pp_size=pp)(
                forward_step_func=self._forward_step, data_iterator=iter(data),
                model=lm.ddp, num_microbatches=len(data), seq_length=self.model_cfg.seq_length,
                micro_batch_size=self.micro_batch_size, forward_only=forward_only,
                pg_collection=lm.groups.collection, **extra)
        summed = torch.zeros(2, dtype=torch.float64, device=device)
        if lm.groups.rank.tp == 0:
            for out in outputs or []:
                summed += out["lm loss"].to(torch.float64)
        grads = {}
        for samples, emb in leaves:
            if emb.grad is None:
                continue
            sizes = [received[s].shape[0] for s in samples]
            grads.update(zip(samples, torch.split(emb.grad, sizes)))
        return summed, grads

    @staticmethod
    def _forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"],
                       image_embeddings=mb.get("image_embeddings"))
        return output, partial(_loss_func, mb["loss_mask"])

    def grad_stats(self) -> GradStats:
        """The gradient norm over every module together (each module's norm, over its own
        model-parallel ranks, counted once: from its first rank)."""
        squares = torch.zeros(2, dtype=torch.float64, device=dist.device())
        for m in self.modules.values():
            if m.optimizer is None:
                continue
            with cuda_as_cpu():
                found_inf = bool(m.optimizer.prepare_grads())
                norm = m.optimizer.get_grad_norm()
            norm = float("inf") if norm is None else float(norm)
            if self.rank == m.cfg.rank_offset:
                squares[0] += norm ** 2
            squares[1] = max(float(squares[1]), float(found_inf))
        tdist.all_reduce(squares[:1])
        tdist.all_reduce(squares[1:], op=tdist.ReduceOp.MAX)
        return GradStats(norm=float(squares[0]) ** 0.5, found_inf=bool(squares[1]))

    def apply_update(self, *, lr: float, weight_decay: float, clip_coeff: float) -> None:
        for m in self.modules.values():
            if m.optimizer is None:
                continue
            for group in m.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
                group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
            if clip_coeff < 1.0:
                grads = [p.grad for opt in getattr(m.optimizer, "chained_optimizers",
                                                   [m.optimizer])
                         for p in opt.get_parameters() if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, clip_coeff)
            with cuda_as_cpu():
                m.optimizer.step_with_ready_grads()

    # ---- checkpoints ----------------------------------------------------------------------

    def save_hf(self, directory, *, hf_config: dict, hf_source=None) -> None:
        """Write the model as an HF directory (every rank calls it): each module's tensors
        gathered over its own groups and written by its first rank to a file of its own,
        ``model-{module}.safetensors`` (a per-module checkpoint in HF names: no layout in it,
        so it loads at any layout), then the index, ``config.json`` and the processor and
        tokenizer files of ``hf_source``, by rank 0."""
        import json
        from pathlib import Path

        from safetensors import safe_open

        from mbridge.io.hf import INDEX, copy_side_files, write_file
        from mbridge.shell import convert

        directory = Path(directory)
        mapping = registry.get(self.spec.architecture).mapping(
            self.spec, self.plan.parallel.vocab_multiple, **self.mapping_options)
        for name, m in self.modules.items():
            part = (lambda k: not _is_vision(k)) if name == self.lm_name else _is_vision
            groups = [g for g in mapping if all(part(k) for k in g.mcore_keys)]
            tensors = dict(convert.iter_hf([m.ddp.module], groups, self.spec, m.groups))
            if self.rank == m.cfg.rank_offset:
                write_file(directory / f"model-{name}.safetensors",
                           {k: v.contiguous().cpu() for k, v in tensors.items()})
        tdist.barrier()
        if self.rank == 0:
            weight_map, total = {}, 0
            for name in sorted(self.mimo.module_parallelisms):
                file = f"model-{name}.safetensors"
                with safe_open(directory / file, "pt") as f:
                    for key in f.keys():
                        weight_map[key] = file
                        t = f.get_slice(key)
                        total += _nbytes(t.get_shape(), t.get_dtype())
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            copy_side_files(hf_source, directory)
        tdist.barrier()

    def skip_update(self) -> None:
        """Nothing to undo: gradients are zeroed at the start of the next step."""

    def loss_scale(self) -> float:
        return 1.0 if self.dtype != "float16" else float(
            next(m.optimizer for m in self.modules.values() if m.optimizer).get_loss_scale())

    def evaluate(self, batches) -> LossSum:
        total, tokens = 0.0, 0
        for m in self.modules.values():
            m.ddp.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    out = self._run(batch, seed=self.seed, forward_only=True)
                    total, tokens = total + out.total, tokens + out.tokens
        finally:
            for m in self.modules.values():
                m.ddp.train()
        return LossSum(total=total, tokens=tokens)
