"""Training entry points (the facade over ``mbridge.shell.pretrain``), Megatron-Bridge's
``pretrain(config)`` and ``finetune(config)`` (both take ``forward_step=`` and
``dataset_provider=``, see ``DataContext``):

    from mbridge.train import recipes
    from mbridge.training import pretrain
    state = pretrain(recipes.tiny_llama_pretrain())

Launch on several ranks with ``torchrun --nproc-per-node 2 -m mbridge.train --recipe NAME``.
"""

from mbridge.shell.pretrain import DataContext, finetune, pretrain

__all__ = ["DataContext", "finetune", "pretrain"]
