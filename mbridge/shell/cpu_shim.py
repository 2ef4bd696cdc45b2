"""Let Megatron-Core (0.16.1 and 0.19.2, the releases CI tests) run on a machine without CUDA.

Applied by ``apply()`` only when ``torch.cuda.is_available()`` is False; with CUDA present it
does nothing. It bridges exactly these CUDA-only calls (items 7 and 8 are Transformer
Engine's, not CUDA's: ``bridge_missing_te()`` applies them on any device, GPU included,
where Megatron-Core 0.16's router fails its first forward with ``NameError: name
'te_general_gemm' is not defined`` without TE; ``apply()`` calls it too):

1. ``torch.cuda.current_device()`` -> ``"cpu"``: Megatron passes it as ``device=`` when it
   allocates (rotary frequencies, softmax offsets, buffers).
2. ``torch.cuda.synchronize()`` -> no-op.
3. The RNG tracker (``megatron/core/tensor_parallel/random.py``) stores and swaps CUDA
   generator states; here its get/set helpers use the CPU generator, so ``fork()`` and
   ``model_parallel_cuda_manual_seed`` work and stay reproducible.
4. The default causal and sliding-window masks (``megatron/core/transformer/utils.py``) are
   built on ``"cuda"``; here they are built on the CPU.
5. ``Tensor.cuda()`` -> the tensor itself: Megatron moves tensors with it before collectives
   (e.g. the tied-embedding all-reduce in ``LanguageModule.setup_embeddings_and_output_layer``).
6. ``cuda_as_cpu()``, a context the training runtime enters (not installed by ``apply``):
   Megatron-Core's optimizer, gradient clipping, grad scaler and pipeline schedules allocate
   with a literal ``device="cuda"`` (``optimizer.py`` ``_dummy_overflow_buf``,
   ``clip_grads.py``, ``schedules.py`` ``total_num_tokens``) and check
   ``param.type() == "torch.cuda.FloatTensor"`` (``distrib_optimizer.py``,
   ``clip_grads.py``). Inside it, such allocations land on the CPU and ``Tensor.type()``
   names the CUDA type. Scoped, since a TorchFunctionMode adds a Python call to every torch op.
7. The MoE router's gating GEMM (``RouterGatingLinearFunction`` in
   ``megatron/core/transformer/moe/moe_utils.py``) tests ``te_general_gemm is not None``, a
   name bound only when Transformer Engine imports; here it is bound to None, so the router
   takes its ``torch.mm`` path.
8. Multi-latent attention builds its core attention with Transformer Engine's keywords
   ``k_channels``/``v_channels`` (``multi_latent_attention.py``); the local
   ``DotProductAttention`` (and mbridge's SDPA subclass) accepts them here, checking that
   ``v_channels`` equals ``config.kv_channels`` (mbridge sets it to ``v_head_dim``), which
   sizes its output. And ``multi_latent_attention.HAVE_TE`` is True without Transformer
   Engine (``megatron/core/extensions/transformer_engine.py`` imports, with ``TELinear`` a
   mock), so ``isinstance(self.linear_proj, TELinear)`` raises; it is set to False.
   (MoE's all-to-all dispatcher needs CUDA streams: without CUDA the shell picks the
   all-gather dispatcher instead, shell/model.py.)
9. Without Apex or TE, gradient clipping (``optimizer/clip_grads.py``) takes
   ``local_multi_tensor_l2_norm``, whose ``torch.tensor(list of 0-d norms)`` copies each
   parameter's norm to the host: one device sync per parameter (over 1,000 a step at 4 MoE
   layers of 128 experts). ``bridge_missing_te`` replaces it there with
   ``foreach_l2_norm``: the same per-tensor norms from ``torch._foreach_norm``, reduced on
   the device; and its ``local_multi_tensor_scale`` (a multiply and a copy per parameter,
   256 launches a step for LoRA on a 16-layer model, in a host-bound stretch after the norm's
   sync) with ``foreach_scale``: ``torch._foreach_mul_``, the same products.
10. ``torch.cuda.current_stream()`` -> the CPU's current stream (``torch.cpu.Stream``, whose
   ``wait_event``/``wait_stream`` do nothing): from Megatron-Core 0.19 the data-parallel
   gradient sync waits on it for CUDA-graph events before every reduction
   (``distributed/param_and_grad_buffer.py`` ``start_grad_sync``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


def apply() -> bool:
    """Install the shim if CUDA is absent. Returns whether it is installed."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as mutils

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: torch.cpu.current_stream()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _patch_tracker_add(mrandom)
    bridge_missing_te()
    for module in (fused_softmax, mutils):
        module.get_default_causal_mask = _causal_mask
        module.get_sliding_window_causal_mask = _sliding_window_mask
    _applied = True
    return True


_te_bridged = False


def bridge_missing_te() -> None:
    """Items 7 and 8 above, on any device; once per process (it wraps a constructor)."""
    global _te_bridged
    if _te_bridged:
        return
    _te_bridged = True
    import importlib.util

    from megatron.core.transformer import dot_product_attention as dpa
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils

    if importlib.util.find_spec("transformer_engine") is None:
        mla.HAVE_TE = False

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    init = dpa.DotProductAttention.__init__

    def accept_mla_channels(self, config, *args, k_channels=None, v_channels=None, **kwargs):
        if v_channels is not None and v_channels != config.kv_channels:
            raise ValueError(f"v_channels={v_channels} but kv_channels={config.kv_channels}: "
                             "the local core attention sizes its output by kv_channels")
        init(self, config, *args, **kwargs)

    dpa.DotProductAttention.__init__ = accept_mla_channels
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is mutils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    from megatron.core.optimizer import optimizer as moptimizer

    for mod in (clip_grads, moptimizer):  # clipping; the fp16 optimizer's main->model copy
        if getattr(mod, "multi_tensor_scale_impl", None) is mutils.local_multi_tensor_scale:
            mod.multi_tensor_scale_impl = foreach_scale


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``local_multi_tensor_l2_norm`` (item 9): ``([norm], None)``, the float32
    L2 norm over every tensor of ``tensor_lists``, with no host sync."""
    tensors = [t for group in tensor_lists for t in group]
    if not tensors:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.zeros(1, dtype=torch.float, device=device), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale) -> None:
    """Drop-in for ``local_multi_tensor_scale`` (item 9): ``dst = src * scale`` for each pair,
    as ``torch._foreach_mul_`` in place where source and destination are the same tensors
    (gradient clipping's call), else products then copies."""
    srcs, dsts = tensor_lists[0], tensor_lists[1]
    if not srcs:
        return
    if all(s is d for s, d in zip(srcs, dsts, strict=True)):
        torch._foreach_mul_(list(dsts), scale)
    else:
        torch._foreach_copy_(list(dsts), torch._foreach_mul(list(srcs), scale))


def _patch_tracker_add(mrandom) -> None:
    """``CudaRNGStatesTracker.add`` seeds the CUDA generator to create a named state; on the
    CPU create that state from a fresh generator instead, leaving the global one untouched."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mrandom.CudaRNGStatesTracker.add = add


def _cpu_device(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    return device


class _CudaAsCpu(TorchFunctionMode):
    """``device="cuda"`` -> CPU; ``Tensor.type()`` -> ``"torch.cuda.FloatTensor"`` style."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def cuda_as_cpu():
    """Context for Megatron-Core's CUDA-only training code on a machine without CUDA
    (item 6 above); does nothing when CUDA is present."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return _CudaAsCpu()
