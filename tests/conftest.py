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
