"""Registry of supported architectures, keyed by the HF ``architectures[0]`` name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mbridge.mappings.core import Mapping
from mbridge.specs import ModelSpec


@dataclass(frozen=True)
class Architecture:
    """What mbridge needs to know about one HF architecture: the config translation pair and
    the mapping (a tuple of key groups in global order)."""

    name: str
    from_hf_config: Callable[[dict[str, Any]], ModelSpec]
    to_hf_config: Callable[[ModelSpec], dict[str, Any]]
    mapping: Callable[..., tuple[Mapping, ...]]


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
    names = hf_config.get("architectures") or []
    if not names:
        raise ValueError("config.json has no 'architectures' entry; cannot tell the model family")
    return get(names[0])
