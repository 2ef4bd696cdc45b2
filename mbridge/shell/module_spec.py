"""Read and edit Megatron-Core layer specs the same way on every supported release.

A layer spec's entries are ``ModuleSpec(module=..., submodules=...)`` in Megatron-Core 0.16;
from 0.18 the MLP entry of ``get_gpt_layer_local_spec`` / ``get_gpt_decoder_block_spec`` is a
builder instead, ``functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))``
or ``partial(MoELayer, submodules=MoESubmodules(...))`` (``models/gpt/gpt_layer_specs.py``,
``models/gpt/moe_module_specs.py``), and the MoE layer's experts entry is
``partial(SequentialMLP, submodules=MLPSubmodules(...))`` (``models/backends.py``
``LocalSpecProvider.grouped_mlp_modules``). These functions answer "what does it build",
"which submodules" and "the same entry building another class" for either form.
"""

from __future__ import annotations

import dataclasses
from functools import partial


def built_class(entry) -> type:
    """The class a spec entry builds: ``ModuleSpec.module``, a ``partial``'s class, or the
    class of a bound classmethod builder (``MLP.as_mlp_submodule`` -> ``MLP``)."""
    target = entry.func if isinstance(entry, partial) else getattr(entry, "module", entry)
    owner = getattr(target, "__self__", None)
    return owner if isinstance(owner, type) else target


def submodules_of(entry):
    """The entry's submodules dataclass (edited in place to swap a layer)."""
    if isinstance(entry, partial):
        return entry.keywords["submodules"]
    return entry.submodules


def building(entry, cls: type):
    """A copy of ``entry`` that builds ``cls`` (a subclass taking the same arguments) instead
    of the class it builds: ``ModuleSpec(module=cls, ...)`` or ``partial(cls, ...)``."""
    if isinstance(entry, partial):
        return partial(cls, *entry.args, **entry.keywords)
    return dataclasses.replace(entry, module=cls)
