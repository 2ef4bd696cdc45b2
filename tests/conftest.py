import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory):
    """Every tiny dense model of tests/models.py, saved once per session: {name: dir}."""
    from models import CONFIGS, make_hf

    root = tmp_path_factory.mktemp("hf")
    return {name: (make_hf(name, root / name), root / name)[1] for name in sorted(CONFIGS)}


@pytest.fixture(scope="session")
def big_model(tmp_path_factory):
    """A ~120 MB HF Llama: its import takes long enough to be interrupted part-way."""
    from models import make_hf

    path = tmp_path_factory.mktemp("big") / "hf"
    make_hf("llama", path, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2)
    return path
