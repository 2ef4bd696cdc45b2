"""The pure core imports nothing from torch.distributed, megatron.core, transformers or the
shell, and opens no files (an import-linter-style contract checked on the source)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "mbridge"
CORE = ["specs.py", "config.py", "mappings", "sharding"]
FORBIDDEN = ("torch.distributed", "megatron", "transformers", "mbridge.shell", "mbridge.io",
             "safetensors", "os", "pathlib", "shutil", "subprocess")
FORBIDDEN_CALLS = {"open", "exec", "eval"}


def core_files():
    for entry in CORE:
        path = ROOT / entry
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("path", list(core_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_is_pure(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), \
                f"{path.name} imports {name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in FORBIDDEN_CALLS, f"{path.name} calls {node.func.id}()"
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            raise AssertionError(f"{path.name} reads the environment")


def test_the_contract_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\n")
    with pytest.raises(AssertionError, match="imports torch.distributed"):
        test_core_module_is_pure(bad)
