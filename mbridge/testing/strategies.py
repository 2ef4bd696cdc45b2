"""Hypothesis strategies for mbridge: model specs, parallel layouts that fit them, and random
HF / Megatron-Core trees shaped as an architecture implies.

Tensors are never drawn element by element: a tree is drawn as a seed (and a dtype) and its
tensors are generated from it, so hypothesis shrinks specs and seeds, not megabytes of floats.

Shapes come from the architecture record, never from a hand-written table: the mcore shape of
every key is ``Architecture.mcore_shape`` and the HF shapes are what ``group.to_hf`` makes of
meta tensors of those shapes (as offline conversion checks a checkpoint).

Example::

    from hypothesis import given
    from mbridge.testing import hf_trees, model_specs

    @given(model_specs().flatmap(lambda spec: hf_trees(spec)))
    def test_something(tree): ...
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Mapping as AbcMapping

import torch
from hypothesis import strategies as st

from mbridge.architectures import registry
from mbridge.mappings.core import Mapping
from mbridge.sharding.plan import stage_layer_counts
from mbridge.specs import MLASpec, ModelSpec, MoESpec, ParallelSpec, RopeSpec, check_model_fits

Tree = dict[str, torch.Tensor]
Shapes = AbcMapping[str, tuple[int, ...]]

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                       "Qwen3ForCausalLM")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
                     "DeepseekV3ForCausalLM", "GptOssForCausalLM")
SEEDS = st.integers(0, 2**32 - 1)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@st.composite
def model_specs(draw, architecture: str | None = None) -> ModelSpec:
    """Small dense ``ModelSpec``s: GQA of 1-4 groups, biases, qk norms, tied embeddings.

    ``architecture``: one of ``DENSE_ARCHITECTURES`` (None: drawn).
    ``model_specs("LlamaForCausalLM").example().architecture == "LlamaForCausalLM"``.
    """
    groups = draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2, 3]))
    return ModelSpec(
        architecture=architecture or draw(st.sampled_from(DENSE_ARCHITECTURES)),
        vocab_size=draw(st.integers(3, 300)),
        hidden_size=draw(st.sampled_from([8, 12, 16])),
        ffn_hidden_size=4 * draw(st.integers(1, 6)),
        num_layers=draw(st.integers(1, 3)),
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=draw(st.sampled_from([2, 4, 6, 8])),
        tie_embeddings=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        rope=RopeSpec(theta=draw(st.sampled_from([1e4, 5e5]))),
    )


@st.composite
def moe_specs(draw, architecture: str | None = None, split: int = 1) -> ModelSpec:
    """Small mixture-of-experts specs with the features each architecture's mapping has
    (shared experts, MLA, biases, sinks, dense layers), sized so that ``split`` divides every
    split dimension: heads, kv groups, widths, MLA ranks and the expert count.

    ``moe_specs(split=2)`` draws specs that shard over TP=2 and expert-TP=2.
    """
    arch = architecture or draw(st.sampled_from(MOE_ARCHITECTURES))
    s = split
    layers = draw(st.integers(1, 3))
    experts = s * draw(st.sampled_from([1, 2, 3]))
    experts += experts == 1  # at least 2
    groups = s * draw(st.sampled_from([1, 2]))
    heads = groups * draw(st.sampled_from([1, 2]))
    dense = tuple(i for i in range(layers) if draw(st.booleans()))
    moe = MoESpec(num_experts=experts, topk=draw(st.integers(1, experts)),
                  ffn_hidden_size=2 * s * draw(st.integers(1, 3)),
                  dense_layers=dense if arch != "MixtralForCausalLM" else ())
    fields: dict = dict(qk_norm=arch == "Qwen3MoeForCausalLM",
                        qkv_bias=arch in ("Qwen2MoeForCausalLM", "GptOssForCausalLM"))
    if arch == "Qwen2MoeForCausalLM":
        moe = moe.replace(shared_ffn_hidden_size=2 * s, shared_gate=True)
    if arch == "GptOssForCausalLM":
        moe = moe.replace(dense_layers=())
        fields.update(linear_bias=True, attention_sinks=True, activation="quick_gelu",
                      glu_linear_offset=1.0, activation_clamp=7.0)
    if arch == "DeepseekV3ForCausalLM":
        moe = moe.replace(shared_ffn_hidden_size=moe.ffn_hidden_size, score="sigmoid",
                          expert_bias=True, dense_layers=tuple(range(len(dense))))
        fields["mla"] = MLASpec(q_lora_rank=draw(st.sampled_from([None, 2 * s])),
                                kv_lora_rank=2 * s, qk_head_dim=2, qk_rope_head_dim=2 * s,
                                v_head_dim=draw(st.sampled_from([2, 4])))
        groups = heads
    return ModelSpec(
        architecture=arch, vocab_size=draw(st.integers(3, 300)), hidden_size=8,
        ffn_hidden_size=4 * s, num_layers=layers, num_heads=heads, num_kv_heads=groups,
        head_dim=fields["mla"].v_head_dim if "mla" in fields else 4,
        tie_embeddings=draw(st.booleans()) if arch != "GptOssForCausalLM" else False,
        moe=moe, **fields)


def _fits(spec: ModelSpec, parallel: ParallelSpec) -> bool:
    try:
        check_model_fits(spec, parallel)
        stage_layer_counts(spec.num_layers, parallel)
    except ValueError:
        return False
    return True


def tp_sizes(spec: ModelSpec, sizes: Sequence[int] = (1, 2, 4)) -> st.SearchStrategy[int]:
    """Tensor-parallel sizes among ``sizes`` that ``spec`` fits (``check_model_fits``)."""
    return st.sampled_from([tp for tp in sizes if _fits(spec, ParallelSpec(tp=tp))])


@st.composite
def layouts(draw, spec: ModelSpec, max_size: int = 4) -> ParallelSpec:
    """``ParallelSpec``s that can host ``spec``: tp, pp, vpp and, for MoE specs, ep and etp,
    each at most ``max_size``, accepted by ``check_model_fits`` and the pipeline split.

    ``layouts(spec).example()`` -> e.g. ``ParallelSpec(tp=2, pp=1, ep=2, etp=1)``.
    """
    sizes = [n for n in (1, 2, 4, 8) if n <= max_size]
    tp = draw(st.sampled_from([n for n in sizes if _fits(spec, ParallelSpec(tp=n))]))
    pp = draw(st.sampled_from([n for n in range(1, max_size + 1)
                               if _fits(spec, ParallelSpec(pp=n))]))
    vpps = [None] + [v for v in range(1, max_size + 1) if pp > 1 and _fits(
        spec, ParallelSpec(pp=pp, vpp=v))]
    vpp = draw(st.sampled_from(vpps))
    ep = etp = 1
    if spec.moe is not None:
        ep = draw(st.sampled_from([n for n in sizes if _fits(spec, ParallelSpec(ep=n))]))
        etp = draw(st.sampled_from([n for n in sizes if _fits(spec, ParallelSpec(etp=n))]))
    parallel = ParallelSpec(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp)
    check_model_fits(spec, parallel)  # each size fits alone; together they must too
    return parallel


def groups_of(spec: ModelSpec, **options) -> tuple[Mapping, ...]:
    """The registry's mapping groups for ``spec`` (``Architecture.mapping``)."""
    return registry.get(spec.architecture).mapping(spec, **options)


def _as_groups(groups: Mapping | Iterable[Mapping] | None, spec: ModelSpec) -> tuple[Mapping, ...]:
    if groups is None:
        return groups_of(spec)
    return (groups,) if isinstance(groups, Mapping) else tuple(groups)


def mcore_shapes(spec: ModelSpec, groups=None, shapes: Shapes | None = None) -> dict:
    """``{mcore key: shape}`` of every key ``groups`` write (default: the registry's mapping
    of ``spec``), from ``shapes`` when given, else ``Architecture.mcore_shape``."""
    shapes = shapes or {}
    return {k: tuple(shapes[k]) if k in shapes else
            registry.get(spec.architecture).mcore_shape(spec, k)
            for g in _as_groups(groups, spec) for k in g.mcore_keys}


def hf_shapes(spec: ModelSpec, groups=None, shapes: Shapes | None = None) -> dict:
    """``{hf key: shape}`` of every key ``groups`` read: ``to_hf`` run on meta tensors of the
    mcore shapes (``mcore_shapes``), so no HF table is needed."""
    out: dict[str, tuple[int, ...]] = {}
    for group in _as_groups(groups, spec):
        mc = mcore_shapes(spec, group, shapes)
        meta = {k: torch.empty(v, device="meta") for k, v in mc.items()}
        out.update({k: tuple(v.shape) for k, v in group.to_hf(meta).items()})
    return out


def random_tree(shapes: Shapes, seed: int, dtype: torch.dtype = torch.float32) -> Tree:
    """Normal random tensors of ``shapes`` from ``seed`` (same seed, same tree)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


def hf_trees(spec: ModelSpec, groups=None, seeds: st.SearchStrategy[int] = SEEDS,
             dtypes: st.SearchStrategy[torch.dtype] = DTYPES,
             shapes: Shapes | None = None) -> st.SearchStrategy[Tree]:
    """Random HF trees holding every key ``groups`` read (default: the registry's mapping
    of ``spec``), shaped as the architecture implies (``hf_shapes``).

    ``shapes`` overrides mcore shapes for keys no registered architecture has.
    ``hf_trees(spec).example()["model.embed_tokens.weight"].shape == (spec.vocab_size, h)``.
    """
    target = hf_shapes(spec, groups, shapes)
    return st.builds(lambda seed, dtype: random_tree(target, seed, dtype), seeds, dtypes)


def mcore_trees(spec: ModelSpec, groups=None, seeds: st.SearchStrategy[int] = SEEDS,
                dtypes: st.SearchStrategy[torch.dtype] = DTYPES,
                shapes: Shapes | None = None) -> st.SearchStrategy[Tree]:
    """Random Megatron-Core trees (global, TP=1, vocabulary unpadded) holding every key
    ``groups`` write, shaped by ``Architecture.mcore_shape`` (or ``shapes``).

    ``mcore_trees(spec).example()["decoder.final_layernorm.weight"].shape == (h,)``.
    """
    target = mcore_shapes(spec, groups, shapes)
    return st.builds(lambda seed, dtype: random_tree(target, seed, dtype), seeds, dtypes)
