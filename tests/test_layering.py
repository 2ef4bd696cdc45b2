"""The layering of ``mbridge/``, checked on the import graph built from the source (every
``import``, at module level or inside a function):

    keys, specs, rope -> sharding -> mappings -> architectures -> adapters -> config -> train
    -> io -> shell -> facade (the package, bridge, offline, verify, testing) -> command lines

Imports point down or sideways within a tier, never up, and the graph has no cycle. The
pure tiers (up to ``train``) import nothing from torch.distributed, megatron.core,
transformers or safetensors, open no files and read no environment variables.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "mbridge"
TIERS = [
    ("keys", "specs", "rope"),
    ("sharding",),
    ("mappings",),
    ("architectures",),
    ("adapters",),
    ("config",),
    ("train",),
    ("io",),
    ("shell",),
    ("__init__", "bridge", "offline", "verify", "testing", "training", "peft", "generation"),
    ("cli", "offline_cli", "data_cli", "peft_cli", "generate_cli", "demo", "__main__",
     "train.__main__"),
]
PURE_TIERS = 7  # keys .. train
FORBIDDEN = ("torch.distributed", "megatron", "transformers", "mbridge.shell", "mbridge.io",
             "safetensors", "os", "pathlib", "shutil", "subprocess")
FORBIDDEN_CALLS = {"open", "exec", "eval"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def tier_of(module: str) -> int:
    """The tier of ``mbridge.x.y``: the longest matching entry wins
    (``train.__main__`` before ``train``)."""
    rest = module.removeprefix("mbridge").removeprefix(".") or "__init__"
    best, best_len = None, -1
    for tier, names in enumerate(TIERS):
        for name in names:
            if (rest == name or rest.startswith(name + ".")) and len(name) > best_len:
                best, best_len = tier, len(name)
    if best is None:
        raise AssertionError(f"{module} has no tier: add it to TIERS in tests/test_layering.py")
    return best


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported mbridge module, line) for every import in ``path``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "mbridge" or name.startswith("mbridge."):
                while name not in MODULES:
                    name = name.rpartition(".")[0]
                out.append((name, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(p) if t != m} for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    mine = tier_of(module)
    for target, line in imports_of(MODULES[module]):
        assert tier_of(target) <= mine, (
            f"{module} (tier {TIERS[mine]}) imports {target} (tier {TIERS[tier_of(target)]}) "
            f"at line {line}: imports must point down")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_testing_kit_imports_only_pure_layers():
    """``mbridge.testing`` (hypothesis + torch + the pure layers) never reaches the shell or io,
    directly or through another module."""
    edges = graph()
    kit = [m for m in MODULES if m == "mbridge.testing" or m.startswith("mbridge.testing.")]
    assert len(kit) >= 3
    for module in kit:
        impure = sorted(m for m in reachable(edges, module)
                        if tier_of(m) >= PURE_TIERS and not m.startswith("mbridge.testing"))
        assert not impure, f"{module} reaches {impure}"


def test_the_checks_can_fail():
    assert reachable({"a": {"b"}, "b": {"c"}, "d": {"a"}}, "a") == {"b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert tier_of("mbridge.shell.model") > tier_of("mbridge.architectures.llama")
    assert tier_of("mbridge.train.__main__") > tier_of("mbridge.train.step")


PURE = [m for m in MODULES if tier_of(m) < PURE_TIERS]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_is_pure(module):
    check_pure(MODULES[module])


def check_pure(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
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


def test_the_purity_contract_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\n")
    with pytest.raises(AssertionError, match="imports torch.distributed"):
        check_pure(bad)


OFFLINE_ENTRIES = ["mbridge", "mbridge.offline", "mbridge.verify", "mbridge.cli",
                   "mbridge.offline_cli"]


def test_offline_conversion_imports_no_megatron_core():
    """Offline conversion runs without Megatron-Core: importing its entry points loads none of
    it (its import costs seconds and prints TE/Apex warnings on every CLI run)."""
    import subprocess
    import sys

    code = ("import sys\n" + "".join(f"import {m}\n" for m in OFFLINE_ENTRIES)
            + "print(sorted({m.split('.')[0] + '.' + m.split('.')[1] for m in sys.modules"
              " if m.startswith('megatron.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", f"these entry points import Megatron-Core: {out.strip()}"
