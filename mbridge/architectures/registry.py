"""The architecture record, and the registry of them keyed by the HF ``architectures[0]`` name.

An ``Architecture`` is the unit of extension: it owns both sides of one HF model family.

- ``from_hf_config``/``to_hf_config``: HF ``config.json`` dict <-> ``ModelSpec``;
- ``mapping(spec, multiple, **options)``: the pure mapping groups in global order;
- ``layer_shapes(spec, layer)``: every Megatron-Core tensor of one decoder layer (local-spec
  names, experts written ``{e}``, TP=1), from which offline conversion derives what a
  distributed checkpoint holds (``mcore_shapes``; ``sharding.dist_checkpoint`` places them);
- ``mcore_config(spec)``: the architecture's part of ``TransformerConfig`` (plain values;
  ``mbridge.config`` adds sizes, layout and dtypes);
- ``layer_builder``: the name of the shell's builder of its layers (``shell/model.py``).

Adding an architecture: one file in ``mbridge/architectures/`` that calls ``register``, a line
in ``architectures/__init__.py``, and a layer builder in the shell only if Megatron-Core's
layers lack something it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mbridge import keys
from mbridge.mappings.core import Mapping
from mbridge.specs import ModelSpec

Shapes = dict[str, tuple[int, ...]]


def _no_config(spec: ModelSpec) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Architecture:
    """What mbridge knows about one HF architecture (see the module docstring)."""

    name: str
    from_hf_config: Callable[[dict[str, Any]], ModelSpec]
    to_hf_config: Callable[[ModelSpec], dict[str, Any]]
    mapping: Callable[..., tuple[Mapping, ...]]
    layer_shapes: Callable[[ModelSpec, int], Shapes]
    mcore_config: Callable[[ModelSpec], dict[str, Any]] = _no_config
    layer_builder: str = "gpt"
    # keyword options of ``mapping`` that read a checkpoint's own key layout (for example
    # experts stacked in one tensor rather than one tensor each); None: no options
    hf_options: Callable[[Iterable[str]], dict[str, Any]] | None = None
    # every mcore tensor outside the language model (a vision tower and its projector),
    # by mcore name; None: there are none
    module_shapes: Callable[[ModelSpec], Shapes] | None = None

    def options_for(self, hf_keys: Iterable[str]) -> dict[str, Any]:
        """The mapping options matching a checkpoint with these keys."""
        return self.hf_options(hf_keys) if self.hf_options else {}

    def mcore_shapes(self, spec: ModelSpec) -> Shapes:
        """Every mcore tensor of ``spec`` at TP=1, vocabulary unpadded: layer keys with their
        index (``decoder.layers.3.x``), experts as ``{e}``."""
        return dict(_shapes(self, spec))

    def mcore_shape(self, spec: ModelSpec, mcore_key: str) -> tuple[int, ...]:
        """``mcore_shapes`` of one concrete key (an expert index looks up ``{e}``); KeyError
        naming the key if the model has no such tensor."""
        shapes = _shapes(self, spec)
        template = keys.expert_template(mcore_key)
        if template not in shapes:
            raise KeyError(f"{mcore_key} is not a tensor of a {spec.architecture} model")
        return shapes[template]


@lru_cache(maxsize=64)
def _shapes(arch: Architecture, spec: ModelSpec) -> Shapes:
    h = spec.hidden_size
    shapes: Shapes = {keys.EMBEDDING: (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        shapes.update({keys.with_layer(i, k): v for k, v in arch.layer_shapes(spec, i).items()})
    shapes[keys.FINAL_NORM] = (h,)
    if not spec.tie_embeddings:
        shapes[keys.OUTPUT] = (spec.vocab_size, h)
    if arch.module_shapes is not None:
        shapes.update(arch.module_shapes(spec))
    return shapes


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.name] = arch
    return arch


def supported() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Architecture:
    """The architecture registered as ``name``; a ValueError listing the supported ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; supported: {', '.join(supported())}"
        ) from None


def architecture_of(hf_config: dict[str, Any]) -> Architecture:
    if not isinstance(hf_config, dict):
        raise ValueError(f"config.json holds a JSON {type(hf_config).__name__}, not an object "
                         "of model settings; is it a Hugging Face config.json?")
    names = hf_config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"config.json has architectures={names!r}; it must be a list of "
                         "class names such as [\"LlamaForCausalLM\"]")
    if not names:
        raise ValueError("config.json has no 'architectures' entry; cannot tell the model family")
    return get(names[0])


# config.json fields whose type the translations rely on (checked when present and not null)
INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "sliding_window", "moe_intermediate_size",
              "num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
              "shared_expert_intermediate_size", "first_k_dense_replace")
NUMBER_FIELDS = ("rms_norm_eps", "rope_theta", "attn_logit_softcapping",
                 "final_logit_softcapping", "query_pre_attn_scalar")


def check_field_types(hf_config: dict[str, Any]) -> None:
    """ValueError naming the first size field that is not an integer (or scale that is not a
    number): ``num_hidden_layers: "four"`` fails here, not deep inside a translation."""
    for key in INT_FIELDS:
        value = hf_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"config.json has {key}={value!r} (a {type(value).__name__}); "
                             "it must be an integer")
    for key in NUMBER_FIELDS:
        value = hf_config.get(key)
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            raise ValueError(f"config.json has {key}={value!r} (a {type(value).__name__}); "
                             "it must be a number")


def from_hf_config(hf_config: dict[str, Any]) -> ModelSpec:
    """HF ``config.json`` dict -> ModelSpec, through the architecture's own translation;
    ValueError naming the field when config.json lacks one or holds one of the wrong type."""
    arch = architecture_of(hf_config)
    check_field_types(hf_config)
    try:
        return arch.from_hf_config(hf_config)
    except KeyError as e:
        raise ValueError(f"config.json has no {e.args[0]!r} field, which {arch.name} "
                         "needs") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"config.json does not describe a valid {arch.name}: "
                         f"{type(e).__name__}: {e}") from None


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    return get(spec.architecture).to_hf_config(spec)
