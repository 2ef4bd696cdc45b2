"""``shell/module_spec`` reads the layer specs of the installed Megatron-Core: the MLP entry is
a ``ModuleSpec`` in 0.16 and a ``functools.partial`` builder from 0.18; both answer with the
class it builds and submodules that, edited, change what is built; ``building`` swaps the
class of either form (the MoE layer's experts: ``GroupedSequentialMLP`` for
``SequentialMLP``, on 0.16 and 0.19 alike)."""

from functools import partial

from moe_models import hf_config

from mbridge import config as mconfig
from mbridge.specs import ParallelSpec


def test_dense_and_moe_entries_name_their_class_and_submodules():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mbridge.shell import dist, model
    from mbridge.shell.module_spec import built_class, submodules_of

    dense = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    assert built_class(dense.mlp) is MLP and built_class(dense.self_attention) is SelfAttention
    assert submodules_of(dense.mlp).linear_fc2 is RowParallelLinear

    spec = mconfig.from_hf_config(hf_config("qwen3_moe").to_dict())  # moe_layer_freq 1,0,1,1
    dist.init(ParallelSpec())
    cfg = model.transformer_config(spec, ParallelSpec())
    block = model.block_spec(cfg, use_te=False, attention="sdpa", vp_stage=None, pp_rank=0)
    mlps = [built_class(layer.submodules.mlp) for layer in block.layer_specs]
    assert [issubclass(m, MoELayer) for m in mlps] == [True, False, True, True]
    from mbridge.shell.experts import GroupedSequentialMLP

    experts = [built_class(submodules_of(layer.submodules.mlp).experts)
               for layer, m in zip(block.layer_specs, mlps) if issubclass(m, MoELayer)]
    assert experts == [GroupedSequentialMLP] * 3

    class Marked(RowParallelLinear):
        pass

    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer

    submodules_of(dense.mlp).linear_fc2 = Marked  # an edit reaches the built layer
    small = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                              use_cpu_initialization=True)
    assert type(TransformerLayer(small, dense).mlp.linear_fc2) is Marked


def test_building_swaps_the_class_of_either_form_and_keeps_its_arguments():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mbridge.shell.experts import GroupedSequentialMLP
    from mbridge.shell.module_spec import building, built_class, submodules_of

    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    for entry in (ModuleSpec(module=SequentialMLP, submodules=sub, params={"a": 1}),
                  partial(SequentialMLP, 3, submodules=sub)):
        swapped = building(entry, GroupedSequentialMLP)
        assert built_class(swapped) is GroupedSequentialMLP and submodules_of(swapped) is sub
        assert built_class(entry) is SequentialMLP  # the entry given is left as it was
    assert building(entry, GroupedSequentialMLP).args == (3,)
