"""Immutable specs: the plain data every pure function in mbridge takes.

A spec is a frozen ``msgspec.Struct``: hashable, JSON-encodable, never holds tensors.
``ModelSpec`` is the normalised architecture (the same fields whatever the HF family),
``ParallelSpec`` the parallel layout, ``RankSpec`` one rank's coordinates in that layout.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16" -> torch.bfloat16``; a ValueError naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


class Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every spec: frozen, strict about unknown fields, JSON round-trippable."""

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str):
        return msgspec.json.decode(data, type=cls)

    def replace(self, **changes):
        return msgspec.structs.replace(self, **changes)


def differences(a: Spec, b: Spec, prefix: str = "") -> tuple[str, ...]:
    """The fields in which two specs differ, nested specs followed into:
    ``differences(m, m.replace(num_layers=3))`` -> ``("num_layers: 4 vs 3",)``."""
    if type(a) is not type(b):
        return (f"{prefix.rstrip('.') or 'spec'}: {a!r} vs {b!r}",)
    out: list[str] = []
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if x == y:
            continue
        if isinstance(x, Spec) and isinstance(y, Spec):
            out += differences(x, y, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}: {x!r} vs {y!r}")
    return tuple(out)


class RopeSpec(Spec, frozen=True, kw_only=True):
    """Rotary embedding. ``kind`` follows HF ``rope_type``: default, linear, llama3."""

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3", "yarn"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn (transformers' ``_compute_yarn_parameters``): ramp bounds, whether they are
    # rounded, and what scales cos/sin (``attention_factor`` or ``mscale``/``mscale_all_dim``)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # multimodal rope (Qwen2-VL, Qwen2.5-VL): the rotary frequencies split into temporal,
    # height and width sections of these sizes (summing to head_dim / 2), each rotated by
    # its own row of 3-D position ids (Megatron-Core's ``position_embedding_type="mrope"``)
    mrope_section: tuple[int, ...] | None = None


class MoESpec(Spec, frozen=True, kw_only=True):
    """Mixture-of-experts MLP: ``num_experts`` routed experts, each a gated MLP of width
    ``ffn_hidden_size`` (gate/up ``[ffn, hidden]``, down ``[hidden, ffn]``), ``topk`` per token,
    plus an optional shared expert of width ``shared_ffn_hidden_size`` (with a sigmoid gate
    ``[1, hidden]`` when ``shared_gate``). Layers in ``dense_layers`` keep the dense MLP of
    ``ModelSpec.ffn_hidden_size``.

    Routing follows Megatron-Core's router: ``score`` softmax or sigmoid; ``pre_softmax``
    takes the softmax over all experts before top-k (no renormalisation); ``expert_bias``
    adds a score-correction bias when choosing experts (DeepSeek-V3); ``num_groups`` and
    ``group_topk`` restrict the choice to the best groups; ``scaling_factor`` scales the
    weights; ``router_fp32`` computes router logits in float32.
    """

    num_experts: int
    topk: int
    ffn_hidden_size: int
    shared_ffn_hidden_size: int | None = None
    shared_gate: bool = False
    score: Literal["softmax", "sigmoid"] = "softmax"
    pre_softmax: bool = False
    expert_bias: bool = False
    num_groups: int | None = None
    group_topk: int | None = None
    scaling_factor: float | None = None
    dense_layers: tuple[int, ...] = ()
    router_fp32: bool = False

    def __post_init__(self):
        if not 0 < self.topk <= self.num_experts:
            raise ValueError(f"topk={self.topk} must be between 1 and num_experts="
                             f"{self.num_experts}")
        if self.ffn_hidden_size <= 0:
            raise ValueError(f"moe ffn_hidden_size={self.ffn_hidden_size} must be positive")
        if self.num_groups is not None and self.num_experts % self.num_groups:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by "
                             f"num_groups={self.num_groups}")

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers


class MLASpec(Spec, frozen=True, kw_only=True):
    """Multi-latent attention (DeepSeek-V2/V3): queries through a rank-``q_lora_rank``
    bottleneck (``None``: a plain projection), keys and values through a shared
    rank-``kv_lora_rank`` latent plus one rotary key of ``qk_rope_head_dim`` for all heads.
    Per head, q and k have ``qk_head_dim + qk_rope_head_dim`` dims and v ``v_head_dim``."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


VISION_TOWERS = ("clip", "qwen2_5_vl")


class VisionSpec(Spec, frozen=True, kw_only=True):
    """The vision side of a vision-language model: a vision tower kept as the HF module
    built from ``tower_config`` (the HF ``vision_config``, canonical JSON) and replicated
    over tensor-parallel ranks, whose features replace the placeholder token
    ``image_token_id`` one row each. ``text_architecture`` names the language model's own
    architecture (``LlamaForCausalLM``).

    ``tower="clip"`` (LLaVA): every image resized to ``image_size``; the features of
    ``feature_layers`` (hidden states indices, concatenated; ``select_strategy="default"``
    drops the CLS token) pass a two-layer MLP projector ``[len(feature_layers) *
    hidden_size] -> [text hidden]`` with activation ``projector_act``; ``tokens_per_image``
    features per image.

    ``tower="qwen2_5_vl"``: images at their own resolution (``image_size`` None), cut into
    ``patch_size`` patches (``temporal_patch_size`` frames deep) on a grid ``(t, h, w)``;
    blocks attend within windows of ``window_size`` pixels except ``full_attention_layers``;
    the tower's own merger joins ``spatial_merge_size ** 2`` neighbouring patches into one
    feature of ``out_hidden_size``: ``t * h * w / spatial_merge_size ** 2`` per image
    (``tokens_for_grid``)."""

    tower: Literal["clip", "qwen2_5_vl"] = "clip"
    tower_config: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    image_size: int | None = None
    patch_size: int
    num_channels: int = 3
    feature_layers: tuple[int, ...] = (-2,)
    select_strategy: Literal["default", "full"] = "default"
    projector_act: str = "gelu"
    projector_bias: bool = True
    spatial_merge_size: int = 1
    temporal_patch_size: int = 1
    out_hidden_size: int | None = None
    window_size: int | None = None
    full_attention_layers: tuple[int, ...] = ()
    image_token_id: int
    text_architecture: str

    def __post_init__(self):
        if self.tower == "clip":
            if self.image_size is None or self.image_size % self.patch_size:
                raise ValueError(f"vision image_size={self.image_size} is not a multiple of "
                                 f"patch_size={self.patch_size}")
            for layer in self.feature_layers:
                if not -(self.num_layers + 1) <= layer <= self.num_layers:
                    raise ValueError(f"vision_feature_layer={layer} is outside the vision "
                                     f"tower's {self.num_layers + 1} hidden states")
        for layer in self.full_attention_layers:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"vision fullatt_block_indexes holds {layer}, outside the "
                                 f"tower's {self.num_layers} blocks")
        if self.window_size is not None and self.window_size % (
                self.patch_size * self.spatial_merge_size):
            raise ValueError(f"vision window_size={self.window_size} is not a multiple of "
                             f"patch_size * spatial_merge_size = "
                             f"{self.patch_size * self.spatial_merge_size}")

    @property
    def tokens_per_image(self) -> int:
        """A fixed-size tower's features per image: ``(image_size / patch_size) ** 2``
        patches, plus the CLS token with ``"full"``. ValueError for a tower that takes
        images at their own size (``tokens_for_grid``)."""
        if self.image_size is None:
            raise ValueError(f"a {self.tower} tower takes images at their own size: its "
                             "features per image follow from the image's grid")
        patches = (self.image_size // self.patch_size) ** 2
        return patches + (self.select_strategy == "full")

    def tokens_for_grid(self, grid: tuple[int, int, int]) -> int:
        """Features of an image on the patch grid ``(t, h, w)``: ``(1, 8, 6)`` with
        ``spatial_merge_size=2`` -> 12."""
        t, h, w = grid
        return t * h * w // self.spatial_merge_size ** 2


class ModelSpec(Spec, frozen=True, kw_only=True):
    """A decoder-only LLM, normalised across HF families.

    Shapes follow from it: q is ``[num_heads * head_dim, hidden]``, k and v
    ``[num_kv_heads * head_dim, hidden]``, the Megatron fused qkv
    ``[num_kv_heads * (num_heads // num_kv_heads + 2) * head_dim, hidden]``.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope: RopeSpec = RopeSpec()
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    activation: Literal["silu", "quick_gelu", "gelu_tanh"] = "silu"
    # GPT-OSS and friends: a bias on every linear layer (Megatron-Core ``add_bias_linear``),
    # a learnable per-head sink logit in the attention softmax, the sliding window on the
    # layers marked True only (None: all layers), and the GLU ``act(gate) * (up + offset)``
    # with gate and up clamped to ``activation_clamp``.
    linear_bias: bool = False
    attention_sinks: bool = False
    window_layers: tuple[bool, ...] | None = None
    glu_linear_offset: float = 0.0
    activation_clamp: float | None = None
    # Gemma 2/3: RMSNorm scaling by ``1 + weight``; norms on the attention and MLP outputs
    # before their residual adds; embeddings multiplied by ``embedding_scale``; a softmax
    # scale of ``attention_scale`` (None: 1/sqrt(head_dim)); attention and final logits
    # soft-capped as ``cap * tanh(x / cap)``; ``local_rope`` on the sliding-window layers
    # (None: ``rope`` on every layer).
    zero_centered_norm: bool = False
    post_norms: bool = False
    embedding_scale: float | None = None
    attention_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    local_rope: RopeSpec | None = None
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    # vision-language models: the vision tower and projector in front of this decoder
    vision: VisionSpec | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


class ParallelSpec(Spec, frozen=True, kw_only=True):
    """Parallel sizes. ``first_stage_layers``/``last_stage_layers`` give an uneven pipeline
    split (Megatron-Core's ``num_layers_in_first/last_pipeline_stage``)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int = 1
    cp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    vocab_multiple: int = 128

    def __post_init__(self):
        for name in ("tp", "pp", "ep", "etp", "cp", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.vpp is not None and (self.vpp < 1 or self.pp == 1 and self.vpp > 1):
            raise ValueError(f"vpp={self.vpp} needs pipeline parallel size > 1 (pp={self.pp})")

    @property
    def vpp_size(self) -> int:
        return self.vpp or 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


class RankSpec(Spec, frozen=True, kw_only=True):
    """One rank's coordinates in a ``ParallelSpec``."""

    tp: int = 0
    pp: int = 0
    ep: int = 0
    etp: int = 0


def check_model_fits(model: ModelSpec, parallel: ParallelSpec) -> None:
    """Raise a ValueError naming what to change if ``parallel`` cannot host ``model``."""
    if model.num_kv_heads % parallel.tp:
        raise ValueError(
            f"num_query_groups={model.num_kv_heads} is not divisible by tensor parallel size "
            f"{parallel.tp}; pick a tensor parallel size that divides {model.num_kv_heads}"
        )
    if model.moe is not None:
        check_moe_fits(model.moe, parallel)
        if model.linear_bias and parallel.etp > 1:
            raise ValueError(f"expert tensor parallel size {parallel.etp} with biased experts: "
                             "Megatron-Core supports expert biases only at size 1")
    if model.mla is not None:
        check_mla_fits(model.mla, parallel)
    if model.ffn_hidden_size % parallel.tp:
        raise ValueError(
            f"ffn_hidden_size={model.ffn_hidden_size} is not divisible by tensor parallel "
            f"size {parallel.tp}"
        )


def check_moe_fits(moe: MoESpec, parallel: ParallelSpec) -> None:
    """Raise a ValueError naming what to change if ``parallel`` cannot host the experts."""
    if moe.num_experts % parallel.ep:
        raise ValueError(f"num_experts={moe.num_experts} is not divisible by expert parallel "
                         f"size {parallel.ep}")
    if moe.ffn_hidden_size % parallel.etp:
        raise ValueError(f"moe ffn_hidden_size={moe.ffn_hidden_size} is not divisible by expert "
                         f"tensor parallel size {parallel.etp}")
    if moe.shared_ffn_hidden_size and moe.shared_ffn_hidden_size % parallel.tp:
        raise ValueError(f"shared expert ffn_hidden_size={moe.shared_ffn_hidden_size} is not "
                         f"divisible by tensor parallel size {parallel.tp}")


def check_mla_fits(mla: MLASpec, parallel: ParallelSpec) -> None:
    """Megatron-Core's local layer spec splits the MLA down-projections over TP ranks."""
    kv_down = mla.kv_lora_rank + mla.qk_rope_head_dim
    sizes = (("q_lora_rank", mla.q_lora_rank), ("kv_lora_rank + qk_rope_head_dim", kv_down))
    for name, size in sizes:
        if size is not None and size % parallel.tp:
            raise ValueError(f"{name}={size} is not divisible by tensor parallel size "
                             f"{parallel.tp}")
