"""Launched by tests/train/test_train_reproducible.py under torchrun (gloo, CPU): build the
run of ``--recipe tiny_llama_pretrain`` with the given overrides, train it (``lr`` 0 keeps
the weights as built) and report a digest of this rank's weights per rank.

usage: init_digest.py KEY=VALUE [KEY=VALUE ...]
"""

import hashlib
import sys

import torch
from dist_util import report

from mbridge.train import config, recipes
from mbridge.training import pretrain


def digest(model) -> str:
    h = hashlib.sha256()
    for chunk in model:
        for name, p in sorted(chunk.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    cfg = config.apply_overrides(recipes.tiny_llama_pretrain(), sys.argv[1:])
    state = pretrain(cfg)
    report(digest=digest(state.model), step=state.step)


if __name__ == "__main__":
    main()
