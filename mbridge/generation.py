"""Greedy generation with the Megatron-Core model at any layout (``mbridge.shell.generate``),
and the same from the command line (``mbridge generate``):

    from mbridge.generation import greedy, load, prompt_ids
    chunks, spec, parallel = load("ckpt/", tp=2)        # every rank, under torchrun
    new = greedy(chunks, prompt_ids(tok, "what is the capital of france ?", chat=True),
                 spec=spec, parallel=parallel, max_new_tokens=16, stop=[tok.eos_token_id])
"""

from mbridge.shell.generate import greedy, load, prompt_ids

__all__ = ["greedy", "load", "prompt_ids"]
