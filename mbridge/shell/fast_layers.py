"""A fast local layer spec for Megatron-Core when Transformer Engine is absent.

Megatron-Core's local ``DotProductAttention`` materialises repeated K/V for GQA and the full
``[b, heads, s, s]`` score matrix through ``baddbmm`` + softmax + ``bmm``. ``SDPAttention``
keeps its constructor (scale, window, dropout, TP split) and replaces the forward with
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU,
GQA through ``enable_gqa`` with no repeated K/V). Softmax variants SDPA cannot express
(learnable or off-by-one offsets, i.e. attention sinks) fall back to the original forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    """Drop-in ``core_attention`` for the local spec: ``[sq, b, np, hn]`` q and
    ``[sk, b, ng, hn]`` k/v in, ``[sq, b, np * hn]`` out."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if self.config.softmax_type != "vanilla":
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        sq, sk = q.shape[2], k.shape[2]
        mask, causal = self._mask(attention_mask, sq, sk, q.device)
        return self._attend(q, k, v, mask, causal)

    def _packed(self, query, key, value, packed):
        """Packed documents (Megatron-Core's ``thd`` layout: ``[t, np, hn]`` q and
        ``[t, ng, hn]`` k/v, boundaries in ``packed.cu_seqlens_q``): causal attention inside
        each document, ``[t, np * hn]`` out. Megatron-Core's local attention refuses packed
        input; TE's has a kernel. Here, on CUDA: flash attention over ``cu_seqlens`` for
        bf16/fp16 (``"varlen"``), FlexAttention's document mask for other dtypes (or when
        ``PACKED_KERNEL = "flex"``), each one op a compiled layer keeps in its graph; on the
        CPU, SDPA with a block-diagonal mask."""
        if packed.qkv_format != "thd":
            raise ValueError(f"packed sequences in {packed.qkv_format!r} layout; only 'thd'")
        window = self.scale_mask_softmax.window_size
        left = None if window is None else window[0]
        kernel = packed_kernel(query)
        if kernel == "flex" and left is None and getattr(packed, "block_mask", None) is not None:
            # the row's block mask, built with its boundaries (forward.packed_seq_params),
            # outside any compiled region: a compiled layer keeps this call in its graph
            t = query.shape[0]
            # contiguous [1, heads, t, hn]: inside a compiled layer the copy fuses into the
            # rope before it, and Inductor's CPU FlexAttention misreads strided inputs (seen:
            # wrong values in a compiled layer, a lowering error alone)
            q, k, v = (x.permute(1, 0, 2).unsqueeze(0).contiguous() for x in (query, key, value))
            out = flex_with_block_mask(q, k, v, packed.block_mask, scale=self.softmax_scale)
            return out.squeeze(0).permute(1, 0, 2).reshape(t, self.hidden_size_per_partition)
        if kernel == "varlen":
            t = query.shape[0]
            cu = packed.cu_seqlens_q.to(query.device)
            out = varlen_document_attention(query, key, value, cu, scale=self.softmax_scale,
                                            left=left,
                                            longest=getattr(packed, "max_document", None))
            return out.reshape(t, self.hidden_size_per_partition)
        return self._packed_masked(query, key, value, packed, left)

    @torch.compiler.disable  # a compiled layer calls out here (FlexAttention compiles itself)
    def _packed_masked(self, query, key, value, packed, left):
        t = query.shape[0]
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
        bounds = packed.cu_seqlens_q.to(query.device).long()
        # output_size: no device-to-host sync to size the result (one per layer otherwise)
        doc = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=query.device),
                                      bounds[1:] - bounds[:-1], output_size=t)
        if packed_kernel(query) == "flex":
            out = flex_document_attention(q, k, v, doc, scale=self.softmax_scale, left=left,
                                          compiled=query.is_cuda, key=packed.cu_seqlens_q)
            return out.squeeze(0).permute(1, 0, 2).reshape(t, self.hidden_size_per_partition)
        out = self._attend(q, k, v, document_mask(doc, left), False)  # [t, 1, np * hn]
        return out.reshape(t, self.hidden_size_per_partition)

    def _attend(self, q, k, v, mask, causal):
        """SDPA over ``[b, heads, s, hn]``; ``[sq, b, np * hn]`` out."""
        sq = q.shape[2]
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout and \
                not self.config.sequence_parallel else _null():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(sq, out.shape[0], self.hidden_size_per_partition)

    def _mask(self, attention_mask, sq: int, sk: int, device):
        """(bool mask with True = attend, or None; is_causal) for SDPA."""
        window = self.scale_mask_softmax.window_size
        if window is not None:
            qi = torch.arange(sq, device=device)[:, None] + (sk - sq)
            ki = torch.arange(sk, device=device)[None, :]
            return (ki <= qi + window[1]) & (ki >= qi - window[0]), False
        if attention_mask is not None:
            return ~attention_mask, False
        return None, sq > 1


PACKED_KERNEL = "auto"  # packed documents: "auto" (varlen for CUDA bf16/fp16 on Ampere or
# newer, flex for other CUDA dtypes and GPUs, sdpa on the CPU), "varlen" (flash attention
# over cu_seqlens, CUDA bf16/fp16, compute capability 8.0+), "flex", "sdpa"


FLASH_DTYPES = (torch.bfloat16, torch.float16)  # what the flash kernel takes


def packed_kernel(x: torch.Tensor | torch.device) -> str:
    """The packed-attention kernel for ``x``: a tensor (its device and dtype decide "auto"),
    or a device, where "auto" is "flex" only when chosen explicitly (the caller building a
    FlexAttention block mask ahead asks this)."""
    if PACKED_KERNEL != "auto":
        return PACKED_KERNEL
    if not isinstance(x, torch.Tensor):
        return "auto" if torch.device(x).type == "cuda" else "sdpa"
    if not x.is_cuda:
        return "sdpa"
    return "varlen" if x.dtype in FLASH_DTYPES and _ampere_or_newer(x.device.index) else "flex"


@torch.compiler.assume_constant_result  # a compiled layer takes the answer as a constant
def _ampere_or_newer(index: int | None) -> bool:
    """Whether the GPU runs torch's flash attention kernel (compute capability 8.0+; older
    ones take FlexAttention)."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def varlen_document_attention(q, k, v, cu_seqlens, *, scale, left=None, longest=None):
    """Causal attention inside each document of a packed ``[t, heads, hn]`` row (documents
    end at ``cu_seqlens``, int32 on q's device; empty documents allowed), ``left`` tokens
    back when given, through the flash attention kernel torch builds for CUDA (the one
    behind SDPA and ``torch.nn.attention.varlen``, called as ``aten._flash_attention_forward``
    over ``cu_seqlens``: there since torch 2.5, its backward is aten's formula, k/v with fewer
    heads than q taken as they are): ``[t, heads, hn]`` out. The longest document is bounded
    by ``longest`` where given, else by ``t`` (a static bound, so a compiled layer keeps one
    graph; the kernel launches blocks for ``bound`` tokens of every document, and those past
    a document's end exit at once, but at ``t`` they are most of the launch). CUDA,
    bf16/fp16 only."""
    if not q.is_cuda or q.dtype not in FLASH_DTYPES:
        raise RuntimeError("the 'varlen' packed kernel (flash attention) needs CUDA bf16/fp16 "
                           f"tensors, not {q.device.type} {q.dtype}; use 'flex' or 'sdpa'")
    t = q.shape[0]
    bound = t if longest is None else min(t, longest)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, bound, bound, 0.0, True, False, scale=scale,
        window_size_left=-1 if left is None else left, window_size_right=0)[0]


def document_mask(doc: torch.Tensor, left: int | None = None) -> torch.Tensor:
    """``[t, t]`` bool, True = attend: causal inside each document (``doc[i]`` is token i's
    document), within ``left`` tokens back when given (sliding window)."""
    qi = torch.arange(doc.shape[0], device=doc.device)
    mask = (doc[:, None] == doc[None, :]) & (qi[None, :] <= qi[:, None])
    if left is not None:
        mask &= qi[None, :] >= qi[:, None] - left
    return mask


_compiled_flex = None
_last_block: tuple = (None, None, None)  # (boundaries tensor, window, block mask)


def document_block_mask(doc: torch.Tensor):
    """FlexAttention's block mask for causal attention inside each document of a packed row
    (``doc[i]``: token i's document, on the device that will attend), built eagerly: where
    a row's boundaries are made, outside any compiled layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (ki <= qi)

    t = doc.shape[0]
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=doc.device)


def flex_with_block_mask(q, k, v, block, *, scale):
    """FlexAttention over ``[1, heads, t, hn]`` with a prepared block mask. Inside a compiled
    layer the call joins the layer's graph (one kernel, no graph break); outside one it goes
    through a compiled ``flex_attention`` (eager FlexAttention is a slow reference)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or not q.is_cuda:
        fn = flex_attention
    else:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flex_document_attention(q, k, v, doc, *, scale, left=None, compiled=True, key=None):
    """The same attention as ``document_mask`` through FlexAttention's block-sparse document
    mask: ``[1, heads, t, hn]`` in and out, only the blocks inside documents computed (the
    dense mask computes all ``t * t``). Compiled on CUDA (eager FlexAttention is a slow
    reference). ``key``: the row's boundaries tensor; every layer of one forward passes the
    same object, so the block mask is built once per row (the cache holds that tensor, so
    its identity cannot be reused by another row's)."""
    global _compiled_flex, _last_block
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        keep = (doc[qi] == doc[ki]) & (ki <= qi)
        return keep if left is None else keep & (ki >= qi - left)

    t = q.shape[2]
    if key is not None and _last_block[0] is key and _last_block[1] == left:
        block = _last_block[2]
    else:
        block = create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=q.device)
        _last_block = (key, left, block) if key is not None else (None, None, None)
    if compiled and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    fn = _compiled_flex if compiled else flex_attention
    return fn(q, k, v, block_mask=block, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def fast_local_spec(qk_layernorm: bool):
    """Megatron-Core's local GPT layer spec with ``SDPAttention`` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                        compiled: bool = False) -> torch.Tensor:
    """Per-token cross entropy ``[s, b]`` of logits ``[s, b, V]`` (any float dtype) against
    labels ``[s, b]``, accumulated in float32, with a hand-written backward. Compiled
    (``compiled=True``), the forward is one pass over the logits (upcast, log-sum-exp and
    the gather fused) and so is the backward: ``softmax - one_hot`` recomputed from the
    saved logits and log-sum-exp and written in the logits' dtype. No float32
    ``[tokens, vocab]`` tensor is ever stored (Megatron-Core's local cross entropy keeps one,
    about 2 GiB per 4096 tokens at a 128k vocabulary), and none is written: autograd's own
    backward of the gather, compiled, scatters into a float32 zeros tensor of that size and
    reads it back, two extra passes over the largest activation of the step."""
    fwd, bwd = (_compiled_ce_parts() if compiled else (_ce_forward, _ce_backward))
    return _TokenCrossEntropy.apply(logits, labels, fwd, bwd)


def _ce_forward(logits, labels):
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    return lse - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1), lse


def _ce_backward(logits, labels, lse, grad):
    p = torch.exp(logits.float() - lse.unsqueeze(-1))
    hit = torch.arange(logits.shape[-1], device=logits.device) == labels.unsqueeze(-1)
    return (torch.where(hit, p - 1.0, p) * grad.unsqueeze(-1)).to(logits.dtype)


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, fwd, bwd):
        loss, lse = fwd(logits, labels)
        ctx.save_for_backward(logits, labels, lse)
        ctx.bwd = bwd
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        return ctx.bwd(logits, labels, lse, grad.contiguous()), None, None, None


_compiled_ce = None


def _compiled_ce_parts():
    global _compiled_ce
    if _compiled_ce is None:
        _compiled_ce = (torch.compile(_ce_forward, dynamic=False),
                        torch.compile(_ce_backward, dynamic=False))
    return _compiled_ce


def compile_layers(model) -> None:
    """Put each transformer layer of a ``GPTModel`` under ``torch.compile`` (fuses the
    elementwise work between the matmuls: SwiGLU, rope, residual adds). Each local
    ``RowParallelLinear`` first gets its TP group handed to its product (``pass_tp_groups``):
    Megatron-Core passes ``None`` there and warns, and a warning is a graph break, so every
    layer compiled to two graphs split at its attention projection."""
    pass_tp_groups([model])
    for layer in model.decoder.layers:
        layer.compile()


def pass_tp_groups(chunks: list) -> None:
    """Hand every local linear its own TP group in the forward (idempotent). Megatron-Core's
    ``RowParallelLinear`` passes ``tp_group=None`` to its product
    (``linear_with_grad_accumulation_and_async_allreduce``, ``linear_with_frozen_weight``),
    which looks the default group up and warns on every call: a Python warning per linear
    per step, and a graph break in a compiled layer."""
    from functools import partial

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    for m in (m for c in chunks for m in c.modules()):
        if type(m) in (ColumnParallelLinear, RowParallelLinear) and \
                getattr(m, "tp_group", None) is not None and \
                not isinstance(m.__dict__.get("_forward_impl"), partial):
            m._forward_impl = partial(_forward_impl_with_group, m._forward_impl, m.tp_group)


def _forward_impl_with_group(impl, group, *args, **kwargs):
    if kwargs.get("tp_group", group) is None:
        kwargs["tp_group"] = group
    return impl(*args, **kwargs)


def use_fused_cross_entropy(model, compile_: bool = True) -> None:
    """Make a tensor-parallel-size-1 ``GPTModel`` compute its loss with
    ``token_cross_entropy`` (compiled unless ``compile_`` is False). Larger TP keeps
    Megatron-Core's vocab-parallel cross entropy, which needs its collectives."""
    if model.config.tensor_model_parallel_size != 1:
        raise ValueError("the fused cross entropy needs tensor_model_parallel_size == 1")

    def compute_language_model_loss(labels, logits):
        loss = token_cross_entropy(logits, labels.transpose(0, 1).contiguous(),
                                   compiled=compile_)
        return loss.transpose(0, 1).contiguous()

    model.compute_language_model_loss = compute_language_model_loss


class _WgradAccumulate:
    """Stand-in for Apex's ``fused_weight_gradient_mlp_cuda``, the module Megatron-Core's
    linear calls under ``gradient_accumulation_fusion``: ``main_grad += grad_output.T @
    input`` for 2-D ``input`` [T, in] and ``grad_output`` [T, out]. On CUDA one cuBLAS GEMM
    with beta = 1 accumulates into the buffer (float32 through ``out_dtype``, as Apex's
    kernel does); elsewhere the product in the inputs' dtype is added, which is what
    autograd and DDP's hook do unfused, bit for bit."""

    calls = 0  # for tests: how many weight gradients went into a buffer here
    fp32_out = True  # False once this torch refused a bf16/fp16 GEMM into float32

    @staticmethod
    def wgrad_gemm_accum_fp32(input, grad_output, main_grad):
        _WgradAccumulate.calls += 1
        if main_grad.is_cuda and input.dtype != torch.float32 and _WgradAccumulate.fp32_out:
            try:
                torch.addmm(main_grad, grad_output.t(), input, out_dtype=torch.float32,
                            out=main_grad)
                return
            except torch.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError, NotImplementedError):
                # torch before 2.8 has no out_dtype: refused before anything is written
                _WgradAccumulate.fp32_out = False
        main_grad.add_(grad_output.t().matmul(input))

    @staticmethod
    def wgrad_gemm_accum_fp16(input, grad_output, main_grad):
        _WgradAccumulate.calls += 1
        if main_grad.is_cuda and input.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), input)
        else:
            main_grad.add_(grad_output.t().matmul(input))


def fuse_output_wgrad(model) -> bool:
    """Add the output layer's weight gradient into DDP's buffer in its GEMM (Megatron-Core's
    ``gradient_accumulation_fusion``, for that one linear) instead of autograd writing a
    bf16 gradient that DDP's hook then reads and adds: at a 152k vocabulary and hidden 2048
    that gradient is 311M elements a micro-batch. Without Apex, the GEMM is
    ``_WgradAccumulate``'s. Applies to a DDP-wrapped ``GPTModel`` (its weights have
    ``main_grad``) with a trainable output layer of its own; a tied one shares its weight
    with the embedding, whose gradient DDP would then drop (the hook skips a parameter whose
    gradient went to the buffer already), and is left alone. Returns whether it applied."""
    from megatron.core.tensor_parallel import layers

    out = getattr(model, "output_layer", None) if getattr(model, "post_process", False) \
        else None
    weight = getattr(out, "weight", None)
    if out is None or weight is None or model.share_embeddings_and_output_weights \
            or not weight.requires_grad or not hasattr(weight, "main_grad") \
            or not hasattr(weight, "grad_added_to_main_grad"):
        return False
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = _WgradAccumulate
    out.gradient_accumulation_fusion = True
    return True


def thd_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each token's position inside its document, ``[total]``, for a packed row whose
    documents end at ``cu_seqlens`` (covering all ``total`` tokens); computed where the
    boundaries are, with no device-to-host sync. A token's document starts at the last
    boundary at or before it: a ``[total, boundaries]`` comparison and a max, where
    ``searchsorted`` over a slice of the boundaries fails in Inductor on CUDA (``SliceView``
    has no strides; seen in a compiled layer)."""
    at = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.long()
    return at - torch.where(cu <= at[:, None], cu, 0).amax(dim=1)


def _thd_rope(t, cu_seqlens, freqs, *args, cp_group=None, **kwargs):
    """Megatron-Core's unfused ``thd`` rope (``rope_utils._apply_rotary_pos_emb_thd``) for a
    context-parallel size of 1, with the per-document frequencies gathered by position in
    one indexing op instead of a split, a Python loop and two ``.tolist()``/``bool`` syncs
    per call (two calls per layer, each draining the GPU queue). The same elementwise math
    on the same values: bit-identical. Other context-parallel sizes, and positional
    options (Megatron-Core passes them by keyword), go to the original. ``kwargs`` are passed
    on to the ``bshd`` rope as the installed release names them (0.16:
    ``multi_latent_attention``; 0.19: ``mla_rotary_interleaved``)."""
    from megatron.core.models.common.embeddings import rope_utils

    if args or cp_group is None or cp_group.size() != 1:
        return _ORIGINAL_THD_ROPE(t, cu_seqlens, freqs, *args, cp_group=cp_group, **kwargs)
    if freqs.shape[0] == t.shape[0]:
        # Megatron-Core's case 1 (freqs hold every packed position; with one context-parallel
        # rank the documents tile t, so cu_seqlens[-1] == t): the slices, joined, are freqs
        packed = freqs
    else:  # case 2: every document starts at position 0
        packed = freqs[thd_positions(cu_seqlens.to(t.device), t.shape[0])]
    return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), packed, **kwargs).squeeze(1)


_ORIGINAL_THD_ROPE = None


def install_thd_rope() -> None:
    """Route Megatron-Core's unfused ``thd`` rope through ``_thd_rope`` (idempotent). Called
    by ``shell.forward.packed_seq_params``, i.e. whenever mbridge runs packed rows."""
    global _ORIGINAL_THD_ROPE
    from megatron.core.models.common.embeddings import rope_utils

    if _ORIGINAL_THD_ROPE is None:
        _ORIGINAL_THD_ROPE = rope_utils._apply_rotary_pos_emb_thd
        rope_utils._apply_rotary_pos_emb_thd = _thd_rope


class _GroupCrossEntropy(torch.autograd.Function):
    """Megatron-Core's unfused vocab-parallel cross entropy
    (``tensor_parallel/cross_entropy.py``, no label smoothing) on a tensor-parallel group
    given by the caller: the same steps and float32 gradients, where Megatron-Core's reads
    ``parallel_state``'s group (its "native" fused form takes a group but returns bfloat16
    gradients)."""

    @staticmethod
    def forward(ctx, logits, target, group):
        from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as V
        from megatron.core.tensor_parallel.utils import VocabUtility

        logits, logits_max = V.calculate_logits_max(logits)
        torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.size(-1), group.rank(), group.size())
        mask, masked_target, predicted, sum_exp, exp_logits = V.calculate_predicted_logits(
            logits, target, logits_max, start, end)
        torch.distributed.all_reduce(predicted, group=group)
        torch.distributed.all_reduce(sum_exp, group=group)
        exp_logits, loss = V.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(exp_logits, mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as V

        softmax, mask, masked_target = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = V.prepare_gradient_calculation_operands(
            softmax, mask)
        grad_input = V.calculate_gradients(grad_2d, arange_1d, masked_target, update,
                                           grad_input, grad_output)
        return grad_input, None, None


def use_group_cross_entropy(model) -> None:
    """Make a ``GPTModel`` compute its loss on its own tensor-parallel group
    (``model.pg_collection.tp``), as a model on groups other than ``parallel_state``'s
    must (MIMO layouts: ``shell.mimo``)."""
    group = model.pg_collection.tp

    def compute_language_model_loss(labels, logits):
        loss = _GroupCrossEntropy.apply(logits, labels.transpose(0, 1).contiguous(), group)
        return loss.transpose(0, 1).contiguous()

    model.compute_language_model_loss = compute_language_model_loss
