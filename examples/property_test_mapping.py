"""Property-test your own mapping with ``mbridge.testing``: here, Meta's original Llama
checkpoint format (``consolidated.00.pth`` names) <-> Megatron-Core, built from mbridge's
combinators plus one custom transform pair.

Meta's format differs from Hugging Face's in names (``layers.{i}.attention.wq.weight``,
``feed_forward.w1``...) and in the rotary layout of ``wq``/``wk``: Meta interleaves the two
rotary halves of each head (pairs ``(x0, x1), (x2, x3)...``) where HF and Megatron-Core keep
them as two halves (transformers' ``convert_llama_weights_to_hf.py`` permutes them). The
mapping below is checked under hypothesis, over random Llama specs, trees and TP sizes, for
every law: exact round trips, declared keys, and commuting with tensor-parallel sharding.

    python examples/property_test_mapping.py           # runs the property, prints a summary
    pytest examples/property_test_mapping.py           # the same property as a pytest test

Needs the test extra (``pip install mbridge[test]``) for hypothesis.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbridge.architectures import get
from mbridge.mappings import Mapping, at, chain, fuse, rename
from mbridge.mappings.ops import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from mbridge.sharding import COLUMN, GATED_COLUMN, ROW, vocab_layout
from mbridge.specs import ModelSpec
from mbridge.testing import check_mapping, hf_trees, model_specs, tp_sizes


def meta_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> two halves per head (``[heads*d, h]``). The head
    count comes from the shape, so a TP shard of whole heads converts on its own."""
    return w.reshape(-1, head_dim // 2, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def halves_to_meta(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of ``meta_to_halves``."""
    return w.reshape(-1, 2, head_dim // 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def meta_llama_mapping(spec: ModelSpec) -> tuple[Mapping, ...]:
    """Mapping groups for a Meta-format Llama: embedding, one group per layer, final norm and
    output, over the same Megatron-Core keys as mbridge's own Llama mapping."""
    d, hpg = spec.head_dim, spec.heads_per_group
    meta, mc = "layers.{i}.", "decoder.layers.{i}."

    def qkv_to_mcore(q, k, v):
        return fuse_qkv(meta_to_halves(q, d), meta_to_halves(k, d), v, head_dim=d)

    def qkv_to_meta(qkv):
        q, k, v = split_qkv(qkv, heads_per_group=hpg, head_dim=d)
        return halves_to_meta(q, d), halves_to_meta(k, d), v

    layer = chain(
        rename(meta + "attention_norm.weight", mc + "input_layernorm.weight"),
        fuse(tuple(meta + f"attention.w{p}.weight" for p in "qkv"),
             mc + "self_attention.linear_qkv.weight", fuse_fn=qkv_to_mcore,
             split_fn=qkv_to_meta, hf_layout=COLUMN, mcore_layout=COLUMN),
        rename(meta + "attention.wo.weight", mc + "self_attention.linear_proj.weight", ROW),
        rename(meta + "ffn_norm.weight", mc + "pre_mlp_layernorm.weight"),
        fuse((meta + "feed_forward.w1.weight", meta + "feed_forward.w3.weight"),
             mc + "mlp.linear_fc1.weight", fuse_fn=fuse_gate_up, split_fn=split_gate_up,
             hf_layout=COLUMN, mcore_layout=GATED_COLUMN),
        rename(meta + "feed_forward.w2.weight", mc + "mlp.linear_fc2.weight", ROW),
    )
    vocab = vocab_layout(spec.vocab_size)
    groups = [rename("tok_embeddings.weight", "embedding.word_embeddings.weight", vocab)]
    groups += [at(layer, i=i) for i in range(spec.num_layers)]
    groups.append(rename("norm.weight", "decoder.final_layernorm.weight"))
    if not spec.tie_embeddings:
        groups.append(rename("output.weight", "output_layer.weight", vocab))
    return tuple(groups)


# Meta's format has no attention biases or qk norms: draw the Llama specs it can hold.
META_SPECS = model_specs("LlamaForCausalLM").map(
    lambda s: s.replace(qkv_bias=False, qk_norm=False))
CHECKED = []


@settings(max_examples=30, deadline=None)
@given(st.data(), META_SPECS)
def test_meta_llama_mapping_obeys_the_laws(data, spec):
    groups = meta_llama_mapping(spec)
    # it targets the very tensors mbridge's Llama mapping writes
    ours = [k for g in groups for k in g.mcore_keys]
    assert sorted(ours) == sorted(k for g in get(spec.architecture).mapping(spec)
                                  for k in g.mcore_keys)
    # HF-side shapes come from Llama's mcore shapes run through *our* to_hf on meta tensors
    tree = data.draw(hf_trees(spec, groups), label="meta tree")
    check_mapping(groups, tree, tp_sizes=(1, data.draw(tp_sizes(spec), label="tp")))
    CHECKED.append((spec.num_layers, len(tree)))


def main() -> None:
    test_meta_llama_mapping_obeys_the_laws()  # hypothesis draws and checks; raises on failure
    tensors = sum(n for _, n in CHECKED)
    print(f"Meta-format Llama mapping: {len(CHECKED)} random specs, {tensors} tensors; "
          "round trips, declared keys and TP sharding laws hold")
    print("PASS")


if __name__ == "__main__":
    main()
