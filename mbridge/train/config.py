"""The run config: one frozen msgspec struct per section, read from YAML/JSON, with dotted
``key=value`` overrides validated against the structs before anything starts.

Keys follow Megatron-Bridge's names where one exists (``train.train_iters``,
``optimizer.lr``, ``scheduler.lr_warmup_iters``, ``checkpoint.save``,
``model.tensor_model_parallel_size``...). Parallel sizes live on ``model`` as in
Megatron-Bridge's providers; ``parallel`` holds how gradients and parameters are kept in
sync (Megatron-Bridge's ``ddp`` section). Pure: the caller reads the file and passes text.

    cfg = apply_overrides(recipes.tiny_llama_pretrain(), ["train.train_iters=5"])
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any, Literal

import msgspec
import yaml

from mbridge.adapters.spec import FUSED_TARGETS, AdapterSpec
from mbridge.sharding.mimo import ModuleParallelismConfig
from mbridge.specs import ModelSpec
from mbridge.train.sft import SFTSpec


class ConfigError(ValueError):
    """A run config that cannot run: unknown key, wrong type, or inconsistent values."""


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: frozen, strict about unknown fields."""


class ModelConfig(Section, frozen=True, kw_only=True):
    """What model to train and how to split it. Exactly one of ``hf_path`` (start from an HF
    checkpoint through AutoBridge) and ``spec`` (random init from a ModelSpec)."""

    hf_path: str | None = None
    spec: ModelSpec | None = None
    seq_length: int = 2048
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # one-GPU speed (shell/fast_layers.py): the loss as one compiled pass over the logits
    # (None: on with CUDA at TP=1), the output layer's weight gradient added into DDP's
    # buffer by its GEMM (None: on with CUDA where the output layer is untied and trained),
    # and each transformer layer under torch.compile
    compiled_cross_entropy: bool | None = None
    output_gradient_accumulation_fusion: bool | None = None
    compile_layers: bool = False
    # mixture of experts at expert-parallel and expert-TP size 1 (README, One GPU): the
    # static-shape token dispatcher (None: in every MoE layer it serves), each layer's
    # experts held as one parameter per linear (the optimizer checkpoint's layout changes
    # with it: resume with the same value), and their weight gradients added into DDP's
    # buffer by the backward's GEMM (needs moe_stacked_experts)
    moe_sorted_dispatch: bool | None = None
    moe_stacked_experts: bool = False
    moe_fuse_wgrad_accumulation: bool = False
    # vision-language models: parts left as loaded (no gradient, no optimizer state)
    freeze_language_model: bool = False
    freeze_vision_model: bool = False
    freeze_vision_projection: bool = False
    # multi-module (MIMO) layouts (mbridge.sharding.mimo, docs/mimo.md): each module of a
    # vision-language model ("images", "language") with its own TP/PP/DP and rank_offset
    module_parallelisms: dict[str, ModuleParallelismConfig] | None = None
    deployment_mode: Literal["homogeneous", "colocated", "heterogeneous"] = "homogeneous"
    llm_module_name: str = "language"


class ParallelConfig(Section, frozen=True, kw_only=True):
    """Gradient and parameter synchronisation (Megatron-Core ``DistributedDataParallelConfig``)."""

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True
    bucket_size: int | None = None


class TrainConfig(Section, frozen=True, kw_only=True):
    train_iters: int = 1000
    global_batch_size: int = 32
    micro_batch_size: int = 1
    eval_interval: int | None = None
    eval_iters: int = 0
    exit_interval: int | None = None
    skip_nonfinite: bool = True  # skip a step whose loss or grad norm is NaN/inf (else raise)


class OptimizerConfig(Section, frozen=True, kw_only=True):
    """Megatron-Core ``OptimizerConfig`` names."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True


class SchedulerConfig(Section, frozen=True, kw_only=True):
    """Megatron-Core ``OptimizerParamScheduler`` settings, in iterations."""

    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None
    lr_warmup_init: float = 0.0
    lr_decay_iters: int | None = None  # default: train.train_iters
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "exponential"
    lr_wsd_decay_iters: int | None = None
    start_weight_decay: float | None = None  # default: optimizer.weight_decay
    end_weight_decay: float | None = None
    weight_decay_incr_style: Literal["constant", "linear", "cosine"] = "constant"


class DataConfig(Section, frozen=True, kw_only=True):
    """Mock data, or Megatron-Core indexed datasets (``prefix`` of ``prefix.bin``/``.idx``)
    blended with ``blend_weights``, split ``split`` (train, valid, test); or, for fine-tuning,
    ``dataset_root`` holding ``training.jsonl`` (and ``validation.jsonl``, ``test.jsonl``)
    made into samples as ``sft`` says (``mbridge.train.sft``), tokenized with ``tokenizer``
    (default: the pretrained checkpoint's)."""

    mock: bool = False
    blend: tuple[str, ...] = ()
    blend_weights: tuple[float, ...] | None = None
    split: str = "969,30,1"
    path_to_cache: str | None = None
    eod_token_id: int = 0
    eod_mask_loss: bool = False
    dataset_root: str | None = None
    tokenizer: str | None = None
    sft: SFTSpec = SFTSpec()


class CheckpointConfig(Section, frozen=True, kw_only=True):
    """``pretrained_checkpoint``: weights only (no optimizer, no progress) to start from, an HF
    directory or a Megatron-Core distributed checkpoint at any layout (a Megatron-LM one
    without ``hf/config.json`` takes its HF config from ``model.hf_path``); ignored when
    ``load`` holds a checkpoint to resume."""

    pretrained_checkpoint: str | None = None
    save: str | None = None
    save_interval: int | None = None
    load: str | None = None
    most_recent_k: int = -1  # keep the last K checkpoints; -1 keeps all
    load_optim: bool = True
    load_rng: bool = True
    exit_on_missing_checkpoint: bool = False


class LoggingConfig(Section, frozen=True, kw_only=True):
    """Megatron-Bridge's ``logger`` section, plus where metrics.jsonl goes."""

    log_interval: int = 10
    output_dir: str = "runs/mbridge"
    tensorboard_dir: str | None = None  # default: {output_dir}/tensorboard
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_entity: str | None = None
    progress_bar: bool = True
    peak_tflops: float | None = None  # per device, for MFU; default: known GPU or none


class PeftConfig(Section, frozen=True, kw_only=True):
    """LoRA/DoRA fine-tuning (``mbridge.adapters.AdapterSpec``'s fields, Megatron-Bridge's
    names): the base is frozen, the optimizer holds the adapters only, and with
    ``adapters_only_checkpoint`` checkpoints hold only the adapters and their optimizer
    state (resume loads the base from ``model.hf_path`` again). ``alpha`` None: 32 for
    LoRA, 64 for DoRA."""

    scheme: Literal["lora", "dora"] = "lora"
    dim: int = 32
    alpha: float | None = None
    dropout: float = 0.0
    dropout_position: Literal["pre", "post"] = "pre"
    target_modules: tuple[str, ...] = FUSED_TARGETS
    exclude_modules: tuple[str, ...] = ()
    adapters_only_checkpoint: bool = True


def adapter_spec(peft: PeftConfig) -> AdapterSpec:
    """The ``AdapterSpec`` a ``peft`` section asks for (ConfigError naming a bad value)."""
    alpha = peft.alpha if peft.alpha is not None else (64.0 if peft.scheme == "dora" else 32.0)
    try:
        return AdapterSpec(scheme=peft.scheme, dim=peft.dim, alpha=alpha, dropout=peft.dropout,
                           dropout_position=peft.dropout_position,
                           target_modules=peft.target_modules,
                           exclude_modules=peft.exclude_modules)
    except ValueError as e:
        raise ConfigError(f"peft: {e}") from None


class RNGConfig(Section, frozen=True, kw_only=True):
    seed: int = 1234


class RunConfig(Section, frozen=True, kw_only=True):
    """Everything one training run needs."""

    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    rng: RNGConfig = RNGConfig()
    peft: PeftConfig | None = None  # LoRA/DoRA fine-tuning; None: train every weight
    mixed_precision: Literal["fp32", "bf16_mixed", "fp16_mixed"] = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a plain dict into a RunConfig; a ConfigError names the bad key."""
    try:
        return msgspec.convert(data, RunConfig, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid run config: {_readable(str(e))}") from None


def from_text(text: str, fmt: Literal["yaml", "json"] = "yaml") -> RunConfig:
    """A RunConfig from YAML or JSON text (all sections optional)."""
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse the {fmt} config: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a run config is a mapping of sections, got {type(data).__name__}")
    return from_dict(data)


def _readable(message: str) -> str:
    """msgspec says ``... - at `$.train.train_iters```; say ``train.train_iters``."""
    return message.replace("`$.", "`").replace("$.", "")


def _choices(key: str) -> tuple | None:
    """The allowed values of a dotted key whose field is a ``Literal``, else None."""
    import types
    import typing

    tp: Any = RunConfig
    for part in key.split("."):
        try:
            tp = typing.get_type_hints(tp).get(part)
        except TypeError:  # not a struct: a key below a plain value
            return None
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else None
        if tp is None:
            return None
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def parse_override(item: str) -> tuple[str, Any, str]:
    """``"train.train_iters=5"`` -> ``("train.train_iters", 5, "5")`` (value read as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.train_iters=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value, raw


def _known_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, value in data.items():
        key = f"{prefix}{name}"
        out += _known_keys(value, f"{key}.") if isinstance(value, dict) else [key]
    return out


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part, _MISSING)
        # an optional sub-struct not set yet (model.spec), or a new entry of a mapping
        # (model.module_parallelisms.images): _check_key allowed it
        if child is None or child is _MISSING:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])!r} "
                              "is a value, not a section")
        node = child
    node[parts[-1]] = value


_MISSING = object()
# fields that are mappings of names the user picks: any entry may be set
OPEN_MAPPINGS = ("model.module_parallelisms",)


def _check_key(data: dict[str, Any], key: str) -> None:
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict) and node.get(part, _MISSING) is None:
            return  # inside an optional struct not set yet: msgspec checks the fields
        if ".".join(parts[:i]) in OPEN_MAPPINGS and isinstance(node, dict):
            return  # a mapping's entry: msgspec checks its fields
        if not isinstance(node, dict) or part not in node:
            close = difflib.get_close_matches(key, _known_keys(data), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        node = node[part]


# Setting the first key replaces the second's choice (a recipe's random-init architecture,
# its mock data) unless the overrides set the second too: `--recipe llama32_1b_pretrain
# model.hf_path=DIR data.blend=[PREFIX]` means that checkpoint on that data.
REPLACES = {"model.hf_path": ("model.spec", None), "data.blend": ("data.mock", False)}


def apply_overrides(config: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """``config`` with each dotted ``key=value`` set, validated as a whole. A value is read
    as YAML (``5``, ``1.0e-3``, ``true``, ``null``, ``[a, b]``); a text field keeps the raw
    text. Unknown keys and wrong types raise ConfigError naming the key. ``model.hf_path``
    and ``data.blend`` replace the recipe's ``model.spec`` and ``data.mock`` (``REPLACES``)."""
    data = config.to_dict()
    overrides = list(overrides)
    given = {parse_override(item)[0] for item in overrides}
    for key, (other, cleared) in REPLACES.items():
        if key in given and not any(g == other or g.startswith(other + ".") for g in given):
            _set(data, other, cleared)
    for item in overrides:
        key, value, raw = parse_override(item)
        _check_key(data, key)
        _set(data, key, value)
        try:
            msgspec.convert(data, RunConfig, strict=False)
        except msgspec.ValidationError as e:
            _set(data, key, raw)  # a str field given something YAML reads as a number
            try:
                msgspec.convert(data, RunConfig, strict=False)
            except msgspec.ValidationError:
                choices = _choices(key)
                hint = f"; expected one of {', '.join(map(repr, choices))}" if choices else ""
                raise ConfigError(f"bad value in override {item!r}: {_readable(str(e))}"
                                  f"{hint}") from None
        # an optional section just set (``peft.scheme=lora``) gets its defaults, so the
        # next override can name its other keys
        data = from_dict(data).to_dict()
    return from_dict(data)
