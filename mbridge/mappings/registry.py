"""Registry of supported architectures, keyed by the HF ``architectures[0]`` name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    # keyword options of ``mapping`` that read a checkpoint's own key layout (for example
    # experts stacked in one tensor rather than one tensor each); None: no options
    hf_options: Callable[[Iterable[str]], dict[str, Any]] | None = None

    def options_for(self, hf_keys: Iterable[str]) -> dict[str, Any]:
        """The mapping options matching a checkpoint with these keys."""
        return self.hf_options(hf_keys) if self.hf_options else {}


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
