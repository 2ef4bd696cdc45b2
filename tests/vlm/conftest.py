import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def llava(tmp_path_factory):
    """A tiny LLaVA (Llama decoder) with its processor and an image-text set: (hf dir,
    data.jsonl)."""
    from llava_models import make_dataset, make_llava

    root = tmp_path_factory.mktemp("llava")
    make_llava(root / "hf")
    return root / "hf", make_dataset(root / "data")


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    """A tiny Qwen2.5-VL with its processor files and an image-text set: (hf dir,
    data.jsonl)."""
    from qwen_models import make_dataset, make_qwen

    root = tmp_path_factory.mktemp("qwen25vl")
    make_qwen(root / "hf")
    return root / "hf", make_dataset(root / "data")
