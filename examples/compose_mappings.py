"""Compose mbridge's pure mappings by hand on a tiny random Llama, no Megatron-Core needed.

Builds a one-layer mapping from combinators (rename, fuse, chain, at), checks it against the
registry's Llama mapping, shards the result for TP=2 and undoes everything, bit for bit.

    python examples/compose_mappings.py
"""

from functools import partial

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mbridge import config
from mbridge.architectures import get
from mbridge.mappings import at, chain, fuse, rename
from mbridge.mappings.ops import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from mbridge.sharding import COLUMN, GATED_COLUMN, ROW, shard_tree, unshard_tree


def main():
    hf_cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    hf_cfg.architectures = ["LlamaForCausalLM"]
    hf_tree = dict(LlamaForCausalLM(hf_cfg).state_dict())
    spec = config.from_hf_config(hf_cfg.to_dict())
    print(f"spec: {spec.num_heads} heads in {spec.num_kv_heads} groups, head_dim {spec.head_dim}")

    # 1. a layer template written by hand: {i} is the layer slot
    hf, mc = "model.layers.{i}.", "decoder.layers.{i}."
    qkv = fuse(tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"),
               mc + "self_attention.linear_qkv.weight",
               fuse_fn=partial(fuse_qkv, head_dim=spec.head_dim),
               split_fn=partial(split_qkv, heads_per_group=spec.heads_per_group,
                                head_dim=spec.head_dim),
               hf_layout=COLUMN, mcore_layout=COLUMN)
    layer = chain(
        rename(hf + "input_layernorm.weight", mc + "input_layernorm.weight"),
        qkv,
        rename(hf + "self_attn.o_proj.weight", mc + "self_attention.linear_proj.weight", ROW),
        rename(hf + "post_attention_layernorm.weight", mc + "pre_mlp_layernorm.weight"),
        fuse((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
             mc + "mlp.linear_fc1.weight", fuse_fn=fuse_gate_up, split_fn=split_gate_up,
             hf_layout=COLUMN, mcore_layout=GATED_COLUMN),
        rename(hf + "mlp.down_proj.weight", mc + "mlp.linear_fc2.weight", ROW),
    )
    layer1 = at(layer, i=1)
    mine = layer1.to_mcore({k: hf_tree[k] for k in layer1.hf_keys})

    # 2. the registry's mapping for the same layer gives the same tree
    registry_layer = get("LlamaForCausalLM").mapping(spec)[2]  # groups: embedding, layer 0, 1...
    theirs = registry_layer.to_mcore({k: hf_tree[k] for k in registry_layer.hf_keys})
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for key, tensor in mine.items():
        print(f"  {key:50s} {list(tensor.shape)}")

    # 3. shard for TP=2, unshard, convert back: bit-exact
    shards = [shard_tree(mine, layer1.mcore_layouts, 2, r) for r in range(2)]
    back = layer1.to_hf(unshard_tree(shards, layer1.mcore_layouts))
    assert all(torch.equal(back[k], hf_tree[k]) for k in layer1.hf_keys)
    qkv_key = mc.format(i=1) + "self_attention.linear_qkv.weight"
    print(f"TP=2 shard of linear_qkv: {list(shards[0][qkv_key].shape)}")
    print("round trip HF -> mcore -> 2 shards -> mcore -> HF: bit-exact")


if __name__ == "__main__":
    main()
