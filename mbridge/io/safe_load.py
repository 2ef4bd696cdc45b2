"""Reading a checkpoint never runs code from it.

A distributed checkpoint holds three kinds of pickles: ``.metadata`` (torch's DCP index,
plain ``pickle``), ``common.pt`` (``torch.save``) and the object records inside the
``.distcp`` files (``torch.save([obj])``, e.g. RNG states and ``_extra_state``). Unpickling
any of them with the plain unpickler runs whatever callable the file names, so a
checkpoint downloaded from elsewhere could execute a command on load.

Here every one of them is read with an allow-list: ``.metadata`` by ``read_metadata``
(the DCP metadata dataclasses, enums, ``torch.Size``, dtypes and paths; nothing else), the
torch files by ``torch.load(weights_only=True)`` (tensors and plain containers).
``McoreReader`` reads all three (``read_metadata``, ``check_pickles``) before a checkpoint
is handed to Megatron-Core's ``dist_checkpointing.load``, which unpickles ``.metadata``
and loads the object records with ``weights_only=False``; ``megatron_loading`` forces
torch's ``weights_only`` for the torch files while Megatron-Core reads them, so the object
records are safe even if they change between the check and the load (``.metadata`` is
re-checked right before).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from mbridge.io.hf import CheckpointError
from mbridge.io.torch_record import Window

METADATA = ".metadata"
COMMON = "common.pt"
# modules whose dataclasses and enums make up a DCP ``.metadata`` (Megatron-Core's included:
# it pickles the save plans' write items into it)
_DCP_MODULES = frozenset({"torch.distributed.checkpoint.metadata",
                          "torch.distributed.checkpoint.planner",
                          "torch.distributed.checkpoint.filesystem"})
_OTHER_GLOBALS = frozenset({("torch", "Size"), ("torch.serialization", "_get_layout"),
                            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                            ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")})
_REFUSED = "refusing to load it: unpickling it would run code"


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` holds."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if dataclasses.is_dataclass(obj) or (isinstance(obj, type)
                                                 and issubclass(obj, enum.Enum)):
                return obj
        elif (module, name) in _OTHER_GLOBALS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


def read_metadata(directory: str | os.PathLike) -> Metadata:
    """The DCP ``Metadata`` of ``directory``, unpickled through the allow-list;
    CheckpointError if the file is missing, corrupt or names anything else."""
    path = Path(directory) / METADATA
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if "never holds" in str(e):
            raise CheckpointError(f"{path}: {e}; {_REFUSED}") from None
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    except Exception as e:  # truncated or garbled pickles raise many types
        raise CheckpointError(f"{path} is corrupt: {type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def load_torch(f, where: str | os.PathLike) -> Any:
    """``torch.load(f, weights_only=True)`` on CPU; ``where`` names the file in errors."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((line for line in first if "GLOBAL" in line or "Unsupported" in line),
                   first[0] if first else "")
        raise CheckpointError(f"{where}: {why.strip()}; {_REFUSED}") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {where}: {type(e).__name__}: {e}") from None


def check_objects(directory: str | os.PathLike, metadata: Metadata) -> None:
    """Load every object record of the checkpoint with ``weights_only=True`` (they are small:
    RNG states, ``_extra_state``, optimizer step counters)."""
    directory = Path(directory)
    objects = {k for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if index.fqn not in objects:
            continue
        where = f"{directory / info.relative_path} (object {index.fqn!r})"
        try:
            stream = open(directory / info.relative_path, "rb")  # noqa: SIM115
        except OSError as e:
            raise CheckpointError(f"cannot read {where}: {e.strerror}") from None
        with stream:
            load_torch(Window(stream, info.offset, info.length), where)


def check_pickles(directory: str | os.PathLike, metadata: Metadata) -> None:
    """Load ``common.pt`` (when present) and every object record of the checkpoint with
    ``weights_only=True``: CheckpointError naming the first that is unreadable or would run
    code. ``metadata``: from ``read_metadata``, its files checked to lie inside
    ``directory``."""
    directory = Path(directory)
    if (directory / COMMON).is_file():
        load_torch(directory / COMMON, directory / COMMON)
    check_objects(directory, metadata)


@contextlib.contextmanager
def megatron_loading(directory: str | os.PathLike) -> Iterator[None]:
    """Around ``dist_checkpointing.load(..., directory)``: re-checks ``.metadata`` (Megatron-Core
    unpickles it with the plain unpickler) and forces ``weights_only`` on every
    ``torch.load`` inside (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``)."""
    read_metadata(directory)
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
