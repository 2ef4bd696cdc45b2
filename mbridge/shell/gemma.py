"""Gemma 2 and 3 layers for Megatron-Core's local spec: the pieces it lacks, as torch modules.

Mirrors ``transformers/models/gemma2/modeling_gemma2.py`` and ``gemma3/modeling_gemma3.py``
on top of ``megatron/core/models/gpt/gpt_layer_specs.py::get_gpt_layer_local_spec``:

- ``ZeroCenteredRMSNorm``: HF's ``Gemma2RMSNorm``/``Gemma3RMSNorm`` (float32 RMS, times
  ``1 + weight``, cast back) for the input, pre-MLP, post, q/k and final norms;
- ``PostNormRowParallelLinear``: ``megatron/core/tensor_parallel/layers.py``'s
  ``RowParallelLinear`` whose (all-reduced) output goes through a post norm, for
  ``linear_proj`` (HF ``post_attention_layernorm``) and ``linear_fc2``
  (``post_feedforward_layernorm``); state dict ``weight``, ``post_layernorm.weight``;
- ``SoftcapAttention``: ``megatron/core/transformer/dot_product_attention.py``'s
  ``DotProductAttention`` (constructor: scale, per-layer window, TP split) with HF's
  ``eager_attention_forward``: scores, ``cap * tanh(scores / cap)``, causal and window mask,
  float32 softmax. Without a cap the layer uses ``SDPAttention`` (or ``DotProductAttention``);
- ``GemmaSelfAttention`` and ``DualRotaryEmbedding``: Gemma 3 rotates sliding layers with the
  local rope and global layers with the global one (``Gemma3RotaryEmbedding``);
- ``finish``: rotary frequencies, and forward hooks for the embedding scale and the final
  logit soft-cap (GPTModel builds those modules itself, so the spec cannot replace them).

The layer keeps the local spec's ``sharded_state_dict_keys_map``, so checkpoints written for
it (offline conversion included) load. Transformer Engine's spec is not supported yet
(``TE = False``: the shell builds these local layers even where TE is installed).
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp

from mbridge.rope import rope_inv_freq
from mbridge.shell.fast_layers import SDPAttention
from mbridge.shell.module_spec import submodules_of
from mbridge.specs import ModelSpec

TE = False  # no Transformer Engine variant of these layers yet (shell/model.py Builder.te)


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm scaling by ``1 + weight`` over the last dim ``[..., hidden_size]``, computed in
    float32 and cast back to the input dtype (HF ``Gemma2RMSNorm``). The weight starts at
    zero (identity) and holds the checkpoint's raw values."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        # replicated over TP: under sequence parallelism its gradient is all-reduced there
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class PostNormRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` ``[s, b, in/tp] -> [s, b, out]`` followed by a
    ``ZeroCenteredRMSNorm`` over ``out`` (after the TP all-reduce or reduce-scatter, so on
    full hidden vectors). ``sharded_state_dict`` (RowParallelLinear's, over its state dict)
    holds ``post_layernorm.weight`` replicated."""

    def __init__(self, input_size: int, output_size: int, *, config, bias: bool, **kwargs):
        if bias:
            raise NotImplementedError("a post norm after a biased row-parallel linear layer")
        super().__init__(input_size, output_size, config=config, bias=bias, **kwargs)
        self.post_layernorm = ZeroCenteredRMSNorm(config, output_size, config.layernorm_epsilon)

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return self.post_layernorm(output), bias


def attend_mask(attention_mask, window, sq: int, sk: int, device) -> torch.Tensor:
    """Bool ``[sq, sk]`` (or ``[b, 1, sq, sk]`` with a mask given), True = attend: causal,
    within Megatron's ``window`` ``(left, right)`` if any (HF window ``W`` = ``(W - 1, 0)``),
    and not masked by Megatron's ``attention_mask`` (True = masked out)."""
    qi = torch.arange(sq, device=device)[:, None] + (sk - sq)
    ki = torch.arange(sk, device=device)[None, :]
    attend = ki <= qi
    if window is not None:
        attend = attend & (ki <= qi + window[1]) & (ki >= qi - window[0])
    if attention_mask is not None:
        attend = attend & ~attention_mask
    return attend


class SoftcapAttention(DotProductAttention):
    """Core attention with tanh-capped logits (Gemma 2's ``attn_logit_softcapping``):
    ``[sq, b, np, hn]`` q and ``[sk, b, ng, hn]`` k/v in, ``[sq, b, np * hn]`` out. Built as
    ``partial(SoftcapAttention, softcap=cap)`` (Megatron-Core's ``Attention`` calls the class
    with its own keywords)."""

    def __init__(self, *args, softcap: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.softcap = softcap

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("soft-capped attention takes no packed sequences or bias")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.softmax_scale  # [b, np, sq, sk]
        scores = torch.tanh(scores / self.softcap) * self.softcap
        sq, sk = scores.shape[2], scores.shape[3]
        attend = attend_mask(attention_mask, self.scale_mask_softmax.window_size, sq, sk,
                             scores.device)
        scores = scores.masked_fill(~attend, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if self.training and self.attention_dropout.p:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        out = torch.matmul(probs, v)  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, out.shape[0], self.hidden_size_per_partition)


class GemmaSelfAttention(SelfAttention):
    """``SelfAttention`` that picks its layer's rope from ``DualRotaryEmbedding``'s stacked
    output ``[2, s, 1, 1, d]`` (0: global, 1: local; the layer is local where
    ``config.window_attn_skip_freq[layer_number - 1]`` is set) before SelfAttention's own
    handling (a ``[s, 1, 1, d]`` tensor used for q and k, or a ``(q, k)`` tuple)."""

    def __init__(self, config, submodules, layer_number: int, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        windows = config.window_attn_skip_freq
        self.rope_index = int(isinstance(windows, list) and bool(windows[layer_number - 1]))

    def forward(self, *args, rotary_pos_emb=None, **kwargs):
        if isinstance(rotary_pos_emb, torch.Tensor) and rotary_pos_emb.dim() == 5:
            rotary_pos_emb = rotary_pos_emb[self.rope_index]
        return super().forward(*args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class DualRotaryEmbedding(torch.nn.Module):
    """Replaces ``GPTModel.rotary_pos_emb`` for Gemma 3: ``forward(seq_len, ...)`` returns
    the global and local rotary angles stacked, ``[2, seq_len, 1, 1, head_dim]``, which only
    ``GemmaSelfAttention`` reads. Both are Megatron-Core ``RotaryEmbedding`` modules with
    frequencies from ``rope.rope_inv_freq``."""

    def __init__(self, full: RotaryEmbedding, local_inv_freq: torch.Tensor):
        super().__init__()
        self.full = full
        self.local = RotaryEmbedding(kv_channels=2 * local_inv_freq.numel(), rotary_percent=1.0,
                                     use_cpu_initialization=True, cp_group=full.cp_group)
        self.local.inv_freq = local_inv_freq.to(full.inv_freq.device)

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.full.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, *args, **kwargs) -> torch.Tensor:
        return torch.stack([self.full(max_seq_len, *args, **kwargs),
                            self.local(max_seq_len, *args, **kwargs)])


def core_attention(spec: ModelSpec, attention: str):
    """The core attention class: soft-capped when the spec caps attention logits, else
    ``SDPAttention`` (``attention="sdpa"``) or Megatron-Core's ``DotProductAttention``."""
    if attention not in ("sdpa", "megatron"):
        raise ValueError(f"attention={attention!r}; use 'sdpa' or 'megatron'")
    if spec.attn_logit_softcap is not None:
        return partial(SoftcapAttention, softcap=spec.attn_logit_softcap)
    return SDPAttention if attention == "sdpa" else DotProductAttention


def layer_spec(spec: ModelSpec, attention: str):
    """Megatron-Core's local layer spec with Gemma's norms, post norms, rope choice and core
    attention swapped in (its ``sharded_state_dict_keys_map`` kept)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer = get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = ZeroCenteredRMSNorm
    attn = sub.self_attention
    attn.module = GemmaSelfAttention
    attn.submodules.core_attention = core_attention(spec, attention)
    attn.submodules.linear_proj = PostNormRowParallelLinear
    qk = ZeroCenteredRMSNorm if spec.qk_norm else IdentityOp
    attn.submodules.q_layernorm = attn.submodules.k_layernorm = qk
    submodules_of(sub.mlp).linear_fc2 = PostNormRowParallelLinear
    return layer


def layers(spec: ModelSpec, cfg, *, use_te: bool, attention: str, vp_stage, pp_rank):
    """This stage's block: ``layer_spec`` for each of its layers and the zero-centred final
    norm (Megatron-Core's ``TransformerBlockSubmodules``)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    count = get_num_layers_to_build(cfg, vp_stage, pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(spec, attention)] * count,
                                      layer_norm=ZeroCenteredRMSNorm)


def scale_embedding(scale: float, module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on ``GPTModel.embedding``: ``[s, b, h]`` times ``scale`` rounded to the
    embedding weight's dtype, as HF's ``Gemma2TextScaledWordEmbedding``."""
    factor = torch.tensor(scale).to(module.word_embeddings.weight.dtype)
    return output * factor.to(output.device)


def softcap_logits(cap: float, module, args, output):
    """Forward hook on ``GPTModel.output_layer``: ``(logits, bias)`` with the logits (any
    vocab-parallel shard ``[s, b, V/tp]``) as ``cap * tanh(logits / cap)``, so the loss
    GPTModel computes from them sees capped logits too."""
    logits, bias = output
    return torch.tanh(logits / cap) * cap, bias


def finish(model, spec: ModelSpec) -> None:
    """After GPTModel is built: rotary frequencies as transformers computes them (Gemma 3:
    ``DualRotaryEmbedding`` with the local rope too), and forward hooks scaling the
    embedding output (first stage) and soft-capping the output layer's logits (last)."""
    model.rotary_pos_emb.inv_freq = rope_inv_freq(spec.rope, spec.head_dim)
    if spec.local_rope is not None:
        model.rotary_pos_emb = DualRotaryEmbedding(
            model.rotary_pos_emb, rope_inv_freq(spec.local_rope, spec.head_dim))
    if model.pre_process and spec.embedding_scale is not None:
        model.embedding.register_forward_hook(partial(scale_embedding, spec.embedding_scale))
    if model.post_process and spec.final_logit_softcap is not None:
        model.output_layer.register_forward_hook(
            partial(softcap_logits, spec.final_logit_softcap))
