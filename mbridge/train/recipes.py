"""Recipes: plain functions returning a RunConfig; override anything afterwards.

    cfg = recipes.llama32_1b_pretrain(data_paths=["/data/corpus_text_document"])
    cfg = config.apply_overrides(cfg, ["model.tensor_model_parallel_size=2"])

Architectures are those of the public HF configs (``meta-llama/Llama-3.2-1B``,
``meta-llama/Meta-Llama-3-8B``, ``Qwen/Qwen3-8B``); parallel sizes and batch settings follow
Megatron-Bridge's pretraining recipes for the same models. ``hf_path`` starts from a converted
HF checkpoint instead of random init (the architecture then comes from it).
``tiny_llama_pretrain`` trains on a laptop CPU in seconds with mock data.
``tiny_llava_pretrain``/``tiny_llava_finetune`` train a vision-language model (LLaVA) on
image-text records, ``tiny_qwen25vl_pretrain`` a Qwen2.5-VL. The other ``*_finetune`` recipes
start from ``checkpoint.pretrained_checkpoint`` (an HF directory or a distributed checkpoint)
and read SFT JSONL from ``data.dataset_root``. The ``*_peft`` recipes are the same runs with
LoRA on (``peft`` section: dim 32, alpha 32 on linear_qkv, linear_proj, linear_fc1,
linear_fc2, experts included; the base frozen, adapters-only checkpoints) at lr 1e-4, as
Megatron-Bridge's PEFT recipes; ``peft.scheme=dora`` for DoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from msgspec.structs import replace

from mbridge.specs import ModelSpec, RopeSpec
from mbridge.train.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    PeftConfig,
    RunConfig,
    SchedulerConfig,
    TrainConfig,
)

LLAMA32_1B = ModelSpec(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048, ffn_hidden_size=8192,
    num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, norm_eps=1e-5,
    rope=RopeSpec(theta=500000.0, kind="llama3", factor=32.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position_embeddings=8192),
    max_position_embeddings=131072, tie_embeddings=True)

LLAMA3_8B = ModelSpec(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, ffn_hidden_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-5,
    rope=RopeSpec(theta=500000.0), max_position_embeddings=8192)

QWEN3_8B = ModelSpec(
    architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096, ffn_hidden_size=12288,
    num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-6,
    rope=RopeSpec(theta=1000000.0), max_position_embeddings=40960, qk_norm=True)

TINY_LLAMA = ModelSpec(
    architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, ffn_hidden_size=128,
    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, norm_eps=1e-5,
    max_position_embeddings=256)


def _data(data_paths: Sequence[str] | None) -> DataConfig:
    return DataConfig(blend=tuple(data_paths)) if data_paths else DataConfig(mock=True)


def _pretrain(name: str, spec: ModelSpec, *, hf_path: str | None, data_paths, seq_length: int,
              tp: int = 1, pp: int = 1, cp: int = 1, gbs: int = 512, mbs: int = 1,
              train_iters: int = 1_168_251, lr: float = 3e-4, warmup: int = 2000) -> RunConfig:
    """A Megatron-Bridge-style pretraining run: bf16, distributed Adam, cosine decay."""
    out = f"runs/{name}"
    return RunConfig(
        model=ModelConfig(hf_path=hf_path, spec=None if hf_path else spec, seq_length=seq_length,
                          tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          context_parallel_size=cp, sequence_parallel=tp > 1),
        train=TrainConfig(train_iters=train_iters, global_batch_size=gbs, micro_batch_size=mbs,
                          eval_interval=2000, eval_iters=32),
        optimizer=OptimizerConfig(lr=lr, min_lr=lr / 10, weight_decay=0.1, adam_beta2=0.95,
                                  adam_eps=1e-5),
        scheduler=SchedulerConfig(lr_warmup_iters=warmup),
        data=_data(data_paths),
        checkpoint=CheckpointConfig(save=f"{out}/checkpoints", load=f"{out}/checkpoints",
                                    save_interval=2000, most_recent_k=3),
        logging=LoggingConfig(output_dir=out, log_interval=10),
        mixed_precision="bf16_mixed")


def llama32_1b_pretrain(hf_path: str | None = None,
                        data_paths: Sequence[str] | None = None) -> RunConfig:
    """Llama 3.2 1B: TP=1, PP=1, sequence 8192, global batch 512."""
    return _pretrain("llama32_1b_pretrain", LLAMA32_1B, hf_path=hf_path,
                     data_paths=data_paths, seq_length=8192)


def llama3_8b_pretrain(hf_path: str | None = None,
                       data_paths: Sequence[str] | None = None) -> RunConfig:
    """Llama 3 8B: TP=1, PP=1, CP=2, sequence 8192, global batch 512."""
    return _pretrain("llama3_8b_pretrain", LLAMA3_8B, hf_path=hf_path, data_paths=data_paths,
                     seq_length=8192, cp=2)


def qwen3_8b_pretrain(hf_path: str | None = None,
                      data_paths: Sequence[str] | None = None) -> RunConfig:
    """Qwen3 8B: TP=4 with sequence parallelism, PP=1, sequence 4096, global batch 512."""
    return _pretrain("qwen3_8b_pretrain", QWEN3_8B, hf_path=hf_path, data_paths=data_paths,
                     seq_length=4096, tp=4)


def tiny_llama_pretrain(hf_path: str | None = None,
                        data_paths: Sequence[str] | None = None) -> RunConfig:
    """A 4-layer, 64-wide Llama on mock data in fp32: loss falls within 30 steps on a CPU."""
    return RunConfig(
        model=ModelConfig(hf_path=hf_path, spec=None if hf_path else TINY_LLAMA, seq_length=64,
                          make_vocab_size_divisible_by=128),
        train=TrainConfig(train_iters=30, global_batch_size=8, micro_batch_size=2,
                          eval_interval=15, eval_iters=2),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=3, lr_decay_style="cosine"),
        data=_data(data_paths),
        logging=LoggingConfig(output_dir="runs/tiny_llama_pretrain", log_interval=5),
        mixed_precision="fp32")


def _finetune(name: str, *, pretrained_checkpoint: str | None, dataset_root: str | None,
              seq_length: int = 2048, tp: int = 1, pp: int = 1, ep: int = 1, gbs: int = 128,
              mbs: int = 1, train_iters: int = 1000, lr: float = 5e-6,
              warmup: int = 50) -> RunConfig:
    """A Megatron-Bridge-style full fine-tune: the model comes from ``pretrained_checkpoint``
    (set it), data from ``dataset_root`` (training.jsonl, validation.jsonl); bf16,
    distributed Adam, cosine decay to lr/10, answer-only loss."""
    out = f"runs/{name}"
    return RunConfig(
        model=ModelConfig(seq_length=seq_length, tensor_model_parallel_size=tp,
                          pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                          sequence_parallel=tp > 1),
        train=TrainConfig(train_iters=train_iters, global_batch_size=gbs, micro_batch_size=mbs,
                          eval_interval=100, eval_iters=8),
        optimizer=OptimizerConfig(lr=lr, min_lr=lr / 10, weight_decay=0.1, adam_beta2=0.98,
                                  adam_eps=1e-8),
        scheduler=SchedulerConfig(lr_warmup_iters=warmup),
        data=DataConfig(dataset_root=dataset_root),
        checkpoint=CheckpointConfig(pretrained_checkpoint=pretrained_checkpoint,
                                    save=f"{out}/checkpoints", load=f"{out}/checkpoints",
                                    save_interval=200, most_recent_k=2),
        logging=LoggingConfig(output_dir=out, log_interval=10),
        mixed_precision="bf16_mixed")


def llama32_1b_finetune(pretrained_checkpoint: str | None = None,
                        dataset_root: str | None = None) -> RunConfig:
    """Llama 3.2 1B full SFT: TP=1, PP=1, sequence 2048, global batch 128, lr 5e-6."""
    return _finetune("llama32_1b_finetune", pretrained_checkpoint=pretrained_checkpoint,
                     dataset_root=dataset_root)


def llama3_8b_finetune(pretrained_checkpoint: str | None = None,
                       dataset_root: str | None = None) -> RunConfig:
    """Llama 3 8B full SFT: TP=2, PP=1, sequence 2048, global batch 128, lr 5e-6."""
    return _finetune("llama3_8b_finetune", pretrained_checkpoint=pretrained_checkpoint,
                     dataset_root=dataset_root, tp=2)


def qwen3_8b_finetune(pretrained_checkpoint: str | None = None,
                      dataset_root: str | None = None) -> RunConfig:
    """Qwen3 8B full SFT: TP=2, PP=1, sequence 2048, global batch 128, lr 5e-6."""
    return _finetune("qwen3_8b_finetune", pretrained_checkpoint=pretrained_checkpoint,
                     dataset_root=dataset_root, tp=2)


def qwen3_30b_a3b_finetune(pretrained_checkpoint: str | None = None,
                           dataset_root: str | None = None) -> RunConfig:
    """Qwen3-30B-A3B (MoE, 128 experts, 8 active) full SFT: EP=8, TP=1, sequence 2048,
    global batch 128, lr 5e-6, on 8 GPUs."""
    return _finetune("qwen3_30b_a3b_finetune", pretrained_checkpoint=pretrained_checkpoint,
                     dataset_root=dataset_root, ep=8)


def tiny_llama_finetune(pretrained_checkpoint: str | None = None,
                        dataset_root: str | None = None) -> RunConfig:
    """A tiny model (from ``pretrained_checkpoint``) fine-tuned in fp32 on a CPU in seconds:
    sequence 64, 20 steps of 8 samples, validation every 10 steps."""
    return RunConfig(
        model=ModelConfig(seq_length=64, make_vocab_size_divisible_by=32),
        train=TrainConfig(train_iters=20, global_batch_size=8, micro_batch_size=2,
                          eval_interval=10, eval_iters=1),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.0, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=2, lr_decay_style="cosine"),
        data=DataConfig(dataset_root=dataset_root),
        checkpoint=CheckpointConfig(pretrained_checkpoint=pretrained_checkpoint),
        logging=LoggingConfig(output_dir="runs/tiny_llama_finetune", log_interval=5),
        mixed_precision="fp32")


PEFT_LR = 1e-4  # Megatron-Bridge's PEFT recipes (full fine-tunes: 5e-6)


def _peft(cfg: RunConfig, name: str, lr: float = PEFT_LR) -> RunConfig:
    """A fine-tuning recipe with LoRA on: the ``peft`` section's defaults (LoRA, dim 32,
    alpha 32, every linear), lr ``lr`` decaying to lr/10, its own output directories."""
    out = f"runs/{name}"
    ckpt = cfg.checkpoint
    return replace(
        cfg,
        peft=PeftConfig(),
        optimizer=replace(cfg.optimizer, lr=lr, min_lr=lr / 10),
        checkpoint=replace(ckpt, save=ckpt.save and f"{out}/checkpoints",
                           load=ckpt.load and f"{out}/checkpoints"),
        logging=replace(cfg.logging, output_dir=out))


def llama32_1b_peft(pretrained_checkpoint: str | None = None,
                    dataset_root: str | None = None) -> RunConfig:
    """Llama 3.2 1B LoRA SFT: ``llama32_1b_finetune`` with LoRA (dim 32) at lr 1e-4."""
    return _peft(llama32_1b_finetune(pretrained_checkpoint, dataset_root), "llama32_1b_peft")


def llama3_8b_peft(pretrained_checkpoint: str | None = None,
                   dataset_root: str | None = None) -> RunConfig:
    """Llama 3 8B LoRA SFT: TP=1 (the frozen base needs no optimizer state), lr 1e-4."""
    cfg = _peft(llama3_8b_finetune(pretrained_checkpoint, dataset_root), "llama3_8b_peft")
    return replace(cfg, model=replace(cfg.model, tensor_model_parallel_size=1,
                                      sequence_parallel=False))


def qwen3_8b_peft(pretrained_checkpoint: str | None = None,
                  dataset_root: str | None = None) -> RunConfig:
    """Qwen3 8B LoRA SFT: TP=1, lr 1e-4."""
    cfg = _peft(qwen3_8b_finetune(pretrained_checkpoint, dataset_root), "qwen3_8b_peft")
    return replace(cfg, model=replace(cfg.model, tensor_model_parallel_size=1,
                                      sequence_parallel=False))


def qwen3_30b_a3b_peft(pretrained_checkpoint: str | None = None,
                       dataset_root: str | None = None) -> RunConfig:
    """Qwen3-30B-A3B LoRA SFT (adapters on attention and on every expert): EP=8, lr 1e-4."""
    return _peft(qwen3_30b_a3b_finetune(pretrained_checkpoint, dataset_root),
                 "qwen3_30b_a3b_peft")


def tiny_llama_peft(pretrained_checkpoint: str | None = None,
                    dataset_root: str | None = None) -> RunConfig:
    """``tiny_llama_finetune`` with LoRA (dim 32) on a CPU; lr 1e-3 (20 steps of a tiny
    model: Megatron-Bridge's 1e-4 barely moves it)."""
    return _peft(tiny_llama_finetune(pretrained_checkpoint, dataset_root), "tiny_llama_peft",
                 lr=1e-3)


def tiny_llava_pretrain(hf_path: str | None = None,
                        dataset_root: str | None = None) -> RunConfig:
    """LLaVA's first stage on a tiny model (from ``hf_path``, an HF LLaVA directory with its
    processor) in fp32 on a CPU: only the vision projection trains (language and vision
    models frozen), on image-text records (``data.dataset_root``/training.jsonl: ``images``
    and ``text``), loss on the text tokens; sequence 64, 6 steps of 4 samples."""
    return RunConfig(
        model=ModelConfig(hf_path=hf_path, seq_length=64, make_vocab_size_divisible_by=32,
                          freeze_language_model=True, freeze_vision_model=True),
        train=TrainConfig(train_iters=6, global_batch_size=4, micro_batch_size=2,
                          eval_iters=0),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.0, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=1, lr_decay_style="cosine"),
        data=DataConfig(dataset_root=dataset_root),
        logging=LoggingConfig(output_dir="runs/tiny_llava_pretrain", log_interval=1),
        mixed_precision="fp32")


def tiny_llava_finetune(pretrained_checkpoint: str | None = None,
                        dataset_root: str | None = None) -> RunConfig:
    """LLaVA's second stage on a tiny model (from ``pretrained_checkpoint``): the language
    model and the projection train, the vision tower stays frozen; records with ``images``,
    ``prompt`` and ``completion`` score the completion only (``text`` records all text)."""
    return RunConfig(
        model=ModelConfig(seq_length=64, make_vocab_size_divisible_by=32,
                          freeze_vision_model=True),
        train=TrainConfig(train_iters=6, global_batch_size=4, micro_batch_size=2,
                          eval_iters=0),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.0, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=1, lr_decay_style="cosine"),
        data=DataConfig(dataset_root=dataset_root),
        checkpoint=CheckpointConfig(pretrained_checkpoint=pretrained_checkpoint),
        logging=LoggingConfig(output_dir="runs/tiny_llava_finetune", log_interval=1),
        mixed_precision="fp32")


def tiny_qwen25vl_pretrain(hf_path: str | None = None,
                           dataset_root: str | None = None) -> RunConfig:
    """``tiny_llava_pretrain`` for a tiny Qwen2.5-VL (``hf_path``: an HF directory with its
    tokenizer and image processor): only the vision projection (the tower's patch merger)
    trains, on image-text records whose text holds
    ``<|vision_start|><|image_pad|><|vision_end|>`` per image; images at their own size."""
    cfg = tiny_llava_pretrain(hf_path, dataset_root)
    return replace(cfg, logging=replace(cfg.logging, output_dir="runs/tiny_qwen25vl_pretrain"))


RECIPES: dict[str, Callable[..., RunConfig]] = {
    f.__name__: f for f in (llama32_1b_pretrain, llama3_8b_pretrain, qwen3_8b_pretrain,
                            tiny_llama_pretrain, llama32_1b_finetune, llama3_8b_finetune,
                            qwen3_8b_finetune, qwen3_30b_a3b_finetune, tiny_llama_finetune,
                            llama32_1b_peft, llama3_8b_peft, qwen3_8b_peft, qwen3_30b_a3b_peft,
                            tiny_llama_peft, tiny_llava_pretrain, tiny_llava_finetune,
                            tiny_qwen25vl_pretrain)}


def get(name: str) -> Callable[..., RunConfig]:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}") \
            from None
