"""Every supported HF architecture, one file each, registered on import: the config
translation pair, the pure mapping, the Megatron-Core tensor shapes and config, and the name
of the shell's layer builder (``registry.Architecture``). A new architecture is a new file
here plus one line below."""

from mbridge.architectures import (  # noqa: F401  (register)
    deepseek_v3,
    gemma,
    gpt_oss,
    llama,
    llava,
    mistral,
    mixtral,
    qwen2,
    qwen2_5_vl,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from mbridge.architectures.registry import (
    Architecture,
    architecture_of,
    from_hf_config,
    get,
    register,
    supported,
    to_hf_config,
)

__all__ = ["Architecture", "architecture_of", "from_hf_config", "get", "register", "supported",
           "to_hf_config"]
