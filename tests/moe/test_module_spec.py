"""``shell/module_spec`` reads the layer specs of the installed Megatron-Core: the MLP entry is
a ``ModuleSpec`` in 0.16 and a ``functools.partial`` builder from 0.18; both answer with the
class it builds and submodules that, edited, change what is built."""

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

    class Marked(RowParallelLinear):
        pass

    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer

    submodules_of(dense.mlp).linear_fc2 = Marked  # an edit reaches the built layer
    small = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                              use_cpu_initialization=True)
    assert type(TransformerLayer(small, dense).mlp.linear_fc2) is Marked
