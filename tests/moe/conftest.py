import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def moe_dirs(tmp_path_factory):
    """Every tiny MoE model of moe_models.py saved once per session, per expert as
    ``save_pretrained`` writes it, and (where transformers 5 stacks experts in the module)
    also stacked: ``{name: dir}`` and ``{name + "_stacked": dir}``."""
    from moe_models import CONFIGS, make_hf, save_stacked

    root = tmp_path_factory.mktemp("moe")
    dirs = {}
    for name in sorted(CONFIGS):
        model = make_hf(name, root / name)
        dirs[name] = root / name
        if name != "gpt_oss":  # GPT-OSS checkpoints are stacked already
            save_stacked(model, root / f"{name}_stacked")
            dirs[f"{name}_stacked"] = root / f"{name}_stacked"
    return dirs
