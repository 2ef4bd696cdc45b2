"""Effects on files only: lazy HF safetensors reading and atomic sharded writing."""

from mbridge.io.hf import HFCheckpoint, HFWriter, atomic_dir, copy_side_files

__all__ = ["HFCheckpoint", "HFWriter", "atomic_dir", "copy_side_files"]
