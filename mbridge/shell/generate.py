"""Greedy generation on the Megatron-Core model at any layout, to check a model (a converted
checkpoint, a fine-tune) by eye or against ``transformers``' ``generate``.

Each new token is the argmax of the last position's full-vocabulary logits
(``shell.forward.logits``: pipeline stages and vocab shards put together, the same logits on
every rank), so every rank appends the same token and the loop stays in step. No KV cache:
the whole sequence runs again each step, fine for checking, not for serving.

    chunks, spec, parallel = load(DIR, tp=2)                  # every rank
    ids = greedy(chunks, prompt_ids, spec=spec, parallel=parallel, max_new_tokens=16)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mbridge.shell import dist, forward, model, weights
from mbridge.specs import ModelSpec, ParallelSpec


def load(path: str | Path, *, tp: int = 1, pp: int = 1, hf_config: str | Path | None = None,
         dtype: str = "float32"):
    """(chunks, spec, parallel) of the checkpoint at ``path`` (HF directory or distributed
    checkpoint; ``hf_config`` for one carrying no HF config), built at TP=``tp``,
    PP=``pp`` on this world (started here when needed)."""
    source = (weights.open_mcore_weights(path, hf_config) if hf_config is not None
              else weights.open_weights(path))
    parallel = ParallelSpec(tp=tp, pp=pp)
    groups = dist.init(parallel)
    chunks = model.provide(source.spec, parallel, groups, weights=source, dtype=dtype)
    for chunk in chunks:
        chunk.eval()
    return chunks, source.spec, parallel


def greedy(chunks: list, prompt: Sequence[int], *, spec: ModelSpec, parallel: ParallelSpec,
           max_new_tokens: int, stop: Iterable[int] = ()) -> list[int]:
    """The greedy continuation of ``prompt`` (token ids): at most ``max_new_tokens`` ids,
    ending at the first id in ``stop`` (included). Every rank of the model calls it and gets
    the same ids."""
    stop = set(stop)
    ids = list(prompt)
    out: list[int] = []
    dtype = next(model.unwrap(chunks)[0].parameters()).dtype
    for _ in range(max_new_tokens):
        logits = forward.logits(chunks, torch.tensor([ids]), parallel, spec.vocab_size,
                                spec.hidden_size, dtype=dtype)
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
        if nxt in stop:
            break
    return out





def prompt_ids(tok, text: str, *, chat: bool, bos: bool = True) -> list[int]:
    """``text`` as the model should see it: as the user turn of the tokenizer's chat template
    with the generation prompt (``chat``), else its tokens after the BOS (when ``bos`` and the
    tokenizer has one), as ``mbridge.train.sft`` builds a prompt/completion sample."""
    if chat:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return list(tok(rendered, add_special_tokens=False)["input_ids"])
    head = [tok.bos_token_id] if bos and tok.bos_token_id is not None else []
    return head + list(tok(text, add_special_tokens=False)["input_ids"])
__all__ = ["greedy", "load", "prompt_ids"]
