"""Building a model to load weights into skips Megatron-Core's random initialisation
(``shell/model.skip_init_config``: ``perform_initialization=False`` on the local layers) and
restores the tensor-parallel attributes that path would have set (``mark_tensor_parallel``):
every parameter carries the same attributes as in a model built with initialisation, for
dense, MoE, multi-latent-attention and Gemma models. (Values: parity tests load every
parameter and check all were loaded; gradients at TP=2: tests/train, which start from
``model.hf_path`` and so take this path.)
"""

import sys
from pathlib import Path

import pytest
import torch
from models import hf_config as dense_config

from mbridge import config as mconfig
from mbridge.shell import dist, model
from mbridge.specs import ParallelSpec

ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "allreduce",
              "sequence_parallel", "expert_tp", "is_qkv")


def attributes(chunks) -> dict:
    return {name: tuple(getattr(p, a, None) for a in ATTRIBUTES)
            for c in chunks for name, p in c.named_parameters()}


def specs():
    out = [(n, mconfig.from_hf_config(dense_config(n).to_dict()))
           for n in ("llama", "qwen3", "gemma2", "gemma3")]
    sys.path.insert(0, str(Path(__file__).parent / "moe"))
    from moe_models import hf_config as moe_config

    out += [(n, mconfig.from_hf_config(moe_config(n).to_dict()))
            for n in ("qwen3_moe", "deepseek_v3", "gpt_oss")]
    return out


@pytest.mark.parametrize("name,spec", specs(), ids=[n for n, _ in specs()])
def test_skipping_init_keeps_every_tensor_parallel_attribute(name, spec):
    dist.init(ParallelSpec())
    built = model.build_chunks(spec, ParallelSpec(), 0, use_te=False)
    fast = model.build_chunks(spec, ParallelSpec(), 0, use_te=False, skip_init=True)
    assert fast[0].config.perform_initialization is False
    mine, theirs = attributes(fast), attributes(built)
    assert mine.keys() == theirs.keys()
    assert {k: v for k, v in mine.items() if v != theirs[k]} == {}
    # the check can fail: without the restored attributes the linears would differ
    marked = [k for k, v in theirs.items() if v[0] is True]
    assert marked, "no tensor-parallel parameter in the model"


def test_marking_is_what_the_init_path_would_have_set():
    """``mark_tensor_parallel`` sets dim 0 on column-parallel and embedding weights, dim 1 on
    row-parallel ones, and leaves attributes already there alone."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    spec = mconfig.from_hf_config(dense_config("llama").to_dict())
    dist.init(ParallelSpec())
    chunk = model.build_chunks(spec, ParallelSpec(), 0, use_te=False, skip_init=True)[0]
    rows = [m.weight for m in chunk.modules() if isinstance(m, RowParallelLinear)]
    assert rows and all(w.partition_dim == 1 and w.tensor_model_parallel for w in rows)
    assert chunk.embedding.word_embeddings.weight.partition_dim == 0
    model.mark_tensor_parallel(chunk)  # a second pass changes nothing
    assert all(w.partition_dim == 1 for w in rows)
    assert isinstance(rows[0], torch.nn.Parameter)
