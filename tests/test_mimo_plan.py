"""MIMO layouts and data plans (``mbridge.sharding.mimo``, ``mbridge.train.mimo``): the
checks of ``finalize`` (each error names its fix, Megatron-Bridge's four pitfalls among
them), rank ranges -> per-module grids, the DP data plan and the embedding/gradient routes
between modules' DP groups, laws checked over generated layouts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbridge.sharding.mimo import (
    MimoConfigError,
    MimoParallelismConfig,
    ModuleParallelismConfig,
    coordinates,
    module_groups,
    module_ranks,
    modules_on,
    rank_at,
)
from mbridge.train import mimo as plan

M = ModuleParallelismConfig


def config(mode, **mods):
    return MimoParallelismConfig(deployment_mode=mode, module_parallelisms=mods)


HETERO = config("heterogeneous", images=M(rank_offset=0), language=M(rank_offset=1))
FAN_IN = config("colocated", images=M(data_parallel=2), language=M(tensor_parallel=2))


@pytest.mark.parametrize("cfg, world, kwargs, message", [
    (config("colocated", images=M(tensor_parallel=1, pipeline_parallel=2),
            language=M(pipeline_parallel=2)), 2, {}, "colocated mode needs pipeline_parallel=1"),
    (config("colocated", images=M(data_parallel=2), language=M(rank_offset=1)), 2, {},
     "set rank_offset=0 and tp*pp*dp=2"),
    (config("heterogeneous", images=M(data_parallel=2), language=M(rank_offset=1)), 3, {},
     "modules 'images' and 'language' both hold rank 1; shift the rank_offset of "
     "'language' to 2"),
    (config("heterogeneous", images=M(), language=M(rank_offset=2)), 3, {},
     "ranks [1] hold no module"),
    (config("heterogeneous", images=M(), language=M(rank_offset=1, tensor_parallel=2)), 2, {},
     "needs ranks 1..2"),
    (config("homogeneous", images=M(tensor_parallel=2), language=M(data_parallel=2)), 2, {},
     "homogeneous mode uses one layout for every module"),
    (FAN_IN, 2, dict(global_batch_size=3),
     "global batch size 3 is not divisible by module 'images''s data_parallel=2"),
    (FAN_IN, 2, dict(num_heads={"language": 3}),
     "module 'language' has 3 attention heads, not divisible by its tensor_parallel=2"),
    (config("colocated", images=M(data_parallel=2)), 2, {},
     "llm_module_name='language' has no entry"),
])
def test_finalize_names_the_fix(cfg, world, kwargs, message):
    with pytest.raises(MimoConfigError) as e:
        cfg.finalize(world, **kwargs)
    assert message in str(e.value)


def test_unfinalized_config_is_refused():
    with pytest.raises(MimoConfigError, match="not finalized: call cfg = cfg.finalize"):
        module_ranks(HETERO, "images")
    assert HETERO.finalize(2).finalized and not HETERO.finalized


def test_wrong_data_iterator_is_refused():
    plan.check_module_batch("images", range(0, 2), global_batch=4, dp=2, dp_rank=0)
    with pytest.raises(MimoConfigError, match="not the language model's data iterator"):
        plan.check_module_batch("images", range(0, 4), global_batch=4, dp=2, dp_rank=0)


def test_heterogeneous_two_ranks():
    cfg = HETERO.finalize(2)
    assert module_ranks(cfg, "images") == (0,) and module_ranks(cfg, "language") == (1,)
    assert modules_on(cfg, 0) == ("images",) and modules_on(cfg, 1) == ("language",)
    assert plan.embedding_routes(cfg, "images", 2) == (
        plan.Route(sample=0, src=0, dst=1), plan.Route(sample=1, src=0, dst=1))
    assert plan.gradient_routes(cfg, "images", 2) == (
        plan.Route(sample=0, src=1, dst=0), plan.Route(sample=1, src=1, dst=0))


def test_colocated_fan_in_two_ranks():
    cfg = FAN_IN.finalize(2, global_batch_size=4, num_heads={"language": 4})
    assert module_groups(cfg, "images", ("dp",)) == ((0, 1),)
    assert module_groups(cfg, "images", ("tp",)) == ((0,), (1,))
    assert module_groups(cfg, "language", ("tp",)) == ((0, 1),)
    assert module_groups(cfg, "language", ("dp",)) == ((0,), (1,))
    assert plan.dp_fan(4, 2, 1) == ((0, (0,)), (1, (0,)))
    # images rank 0 made samples 0,1, rank 1 samples 2,3; both LM TP ranks need all four
    sends, receives = plan.routes_of(plan.embedding_routes(cfg, "images", 4), 1)
    assert [(r.sample, r.dst) for r in sends] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert [(r.sample, r.src) for r in receives] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    grads = plan.gradient_routes(cfg, "images", 4)
    assert [(r.sample, r.src, r.dst) for r in grads] == [(0, 0, 0), (1, 0, 0), (2, 0, 1),
                                                         (3, 0, 1)]


def test_fan_out_and_batch_plan():
    assert plan.dp_fan(4, 1, 2) == ((0, (0, 1)),)
    assert plan.global_batch_size(2, llm_dp=2) == 4
    assert plan.lm_microbatches(8, 2, 2, 1) == ((4, 5), (6, 7))
    with pytest.raises(MimoConfigError, match="not divisible by train.micro_batch_size=3"):
        plan.lm_microbatches(8, 3, 2, 1)


@st.composite
def layouts(draw):
    """A finalized heterogeneous or colocated config over two modules, and a global batch
    divisible by both DPs."""
    sizes = [(draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])),
              draw(st.sampled_from([1, 2, 3]))) for _ in range(2)]
    mode = draw(st.sampled_from(["heterogeneous", "colocated"]))
    if mode == "colocated":
        world = sizes[0][0] * sizes[0][2]
        # the language model's TP x DP must fill the same world
        tp = draw(st.sampled_from([t for t in (1, 2, 3, 6) if world % t == 0]))
        mods = {"images": M(tensor_parallel=sizes[0][0], data_parallel=sizes[0][2]),
                "language": M(tensor_parallel=tp, data_parallel=world // tp)}
    else:
        first = draw(st.sampled_from(["images", "language"]))
        a, b = (sizes if first == "images" else sizes[::-1])
        size_a = a[0] * a[1] * a[2]
        mods = {first: M(tensor_parallel=a[0], pipeline_parallel=a[1], data_parallel=a[2]),
                ("language" if first == "images" else "images"): M(
                    tensor_parallel=b[0], pipeline_parallel=b[1], data_parallel=b[2],
                    rank_offset=size_a)}
        world = size_a + b[0] * b[1] * b[2]
    dps = [m.data_parallel for m in mods.values()]
    lcm = dps[0] * dps[1] // __import__("math").gcd(*dps)
    gbs = lcm * draw(st.integers(1, 3))
    return config(mode, **mods).finalize(world, global_batch_size=gbs), gbs


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_grids_tile_each_module(case):
    cfg, _ = case
    world = cfg.world_size
    if cfg.deployment_mode == "heterogeneous":
        assert sorted(r for n in cfg.module_parallelisms for r in module_ranks(cfg, n)) == \
            list(range(world))
    for name, m in cfg.module_parallelisms.items():
        for dims in (("tp",), ("dp",), ("pp",)):
            groups = module_groups(cfg, name, dims)
            assert sorted(r for g in groups for r in g) == list(module_ranks(cfg, name))
        for r in module_ranks(cfg, name):
            assert rank_at(cfg, name, **coordinates(cfg, name, r)) == r
        assert all(len(g) == m.tensor_parallel for g in module_groups(cfg, name, ("tp",)))


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_routes_deliver_each_sample_where_it_is_read(case):
    """Every LM rank on the first stage receives exactly the samples its DP replica reads,
    each once, from a rank of the encoder replica that read it; every encoder rank on the
    last stage gets back exactly the gradients of its samples."""
    cfg, gbs = case
    enc, lm = cfg.module_parallelisms["images"], cfg.module_parallelisms["language"]
    forward = plan.embedding_routes(cfg, "images", gbs)
    backward = plan.gradient_routes(cfg, "images", gbs)
    for r in module_ranks(cfg, "language"):
        c = coordinates(cfg, "language", r)
        got = [x.sample for x in plan.routes_of(forward, r)[1]]
        want = list(plan.module_samples(gbs, lm.data_parallel, c["dp"])) if c["pp"] == 0 else []
        assert got == want
    for x in forward:
        assert x.sample in plan.module_samples(gbs, enc.data_parallel,
                                               coordinates(cfg, "images", x.src)["dp"])
    for r in module_ranks(cfg, "images"):
        c = coordinates(cfg, "images", r)
        got = [x.sample for x in plan.routes_of(backward, r)[1]]
        last = c["pp"] == enc.pipeline_parallel - 1
        assert got == (list(plan.module_samples(gbs, enc.data_parallel, c["dp"])) if last
                       else [])
    fan = dict(plan.dp_fan(gbs, enc.data_parallel, lm.data_parallel))
    if enc.data_parallel % lm.data_parallel == 0:  # fan-in: one destination replica each
        assert all(len(v) == 1 for v in fan.values())
    if lm.data_parallel % enc.data_parallel == 0:  # fan-out: ratio destinations each
        assert all(len(v) == lm.data_parallel // enc.data_parallel for v in fan.values())


def test_yaml_run_config_plans_each_module():
    """The example YAML's ``model.module_parallelisms`` becomes a finalized config in the
    run plan; overrides reach a module's keys; a layout that cannot run is a ConfigError
    naming the key."""
    from pathlib import Path

    from mbridge.specs import ModelSpec, VisionSpec
    from mbridge.train.config import ConfigError, apply_overrides, from_text
    from mbridge.train.plan import mimo_config, plan_run

    text = (Path(__file__).parents[1] / "examples/configs/llava_mimo_heterogeneous.yaml")
    cfg = apply_overrides(from_text(text.read_text()),
                          ["model.hf_path=unused", "data.dataset_root=unused"])
    mimo = mimo_config(cfg)
    assert mimo.deployment_mode == "heterogeneous"
    assert module_ranks(mimo.finalize(2), "language") == (1,)
    spec = ModelSpec(architecture="LlavaForConditionalGeneration", vocab_size=96,
                     hidden_size=32, ffn_hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                     vision=VisionSpec(tower_config="{}", hidden_size=16, num_layers=2,
                                       intermediate_size=32, image_size=32, patch_size=8,
                                       image_token_id=3, text_architecture="LlamaForCausalLM"))
    plan_ = plan_run(cfg, spec, 2)
    assert plan_.mimo.world_size == 2 and plan_.dp_size == 1 and plan_.num_microbatches == 2
    wide = apply_overrides(cfg, ["model.deployment_mode=colocated",
                                 "model.module_parallelisms.images.data_parallel=2",
                                 "model.module_parallelisms.images.rank_offset=0",
                                 "model.module_parallelisms.language.tensor_parallel=2",
                                 "model.module_parallelisms.language.rank_offset=0"])
    p = plan_run(wide, spec, 2)
    assert (p.parallel.tp, p.dp_size, p.num_microbatches) == (2, 1, 2)
    with pytest.raises(ConfigError, match=r"module 'language' needs ranks 0\.\.2"):
        plan_run(apply_overrides(wide, ["model.module_parallelisms.language.tensor_parallel=3"]),
                 spec, 2)
    with pytest.raises(ConfigError, match="leave model.tensor_model_parallel_size"):
        plan_run(apply_overrides(cfg, ["model.tensor_model_parallel_size=2"]), spec, 2)
