"""The README's main job, the examples and ``--help`` stay true: each runs here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_compose_mappings_example():
    proc = run("examples/compose_mappings.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bit-exact" in proc.stdout


def test_property_test_mapping_example():
    proc = run("examples/property_test_mapping.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "laws hold" in proc.stdout and proc.stdout.rstrip().endswith("PASS")
    proc = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/property_test_mapping.py")
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:]


HELP_LOADS_NO_TORCH = """
import sys
from mbridge.cli import main
for argv in (["--help"], ["convert", "import", "--help"], ["data", "preprocess", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "transformers"))
print("HEAVY", heavy[:5])
"""


def test_help_lists_commands():
    proc = run("-m", "mbridge", "--help")
    assert proc.returncode == 0
    assert "demo" in proc.stdout
    assert "`" not in proc.stdout  # no RST markup
    proc = run("-c", HELP_LOADS_NO_TORCH)
    assert proc.returncode == 0 and "HEAVY []" in proc.stdout, proc.stdout[-500:]
    proc = run("-m", "mbridge", "demo", "--help")
    assert proc.returncode == 0 and "--workdir" in proc.stdout


@pytest.mark.slow
def test_demo_main_job(tmp_path):
    proc = run("-m", "mbridge", "demo", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "39/39 tensors identical PASS" in proc.stdout
    assert proc.stdout.rstrip().endswith("PASS")
    assert (tmp_path / "exported" / "config.json").is_file()


@pytest.mark.slow
def test_demo_removes_its_temporary_directory(tmp_path):
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run([sys.executable, "-m", "mbridge", "demo", "--layers", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("PASS")
    # torchinductor_<user> is torch's compile cache, kept across runs by design
    assert [p.name for p in (tmp_path / "tmp").iterdir()
            if not p.name.startswith("torchinductor_")] == []


def test_peft_help_and_benchmark_smoke():
    """``mbridge peft --help`` names both actions; the PEFT benchmark's ``--smoke`` mode (a
    tiny shape on CPU) runs every default smoke variant to a throughput, and the
    per-projection LoRA trains exactly as many parameters as transformers + peft."""
    import json

    proc = run("-m", "mbridge", "peft", "--help")
    assert proc.returncode == 0 and "export" in proc.stdout and "merge" in proc.stdout
    # a fresh one-rank world, not the one an in-process test of this session started
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "benchmarks/peft_throughput.py", "--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, (
        line for line in proc.stdout.splitlines() if line.startswith("{")))}
    assert set(rows) == {"mbridge", "mbridge_canonical", "hf_eager"}
    assert all(r.get("tokens_per_s", 0) > 0 for r in rows.values()), rows
    assert rows["mbridge_canonical"]["trainable"] == rows["hf_eager"]["trainable"]


def test_convert_benchmark_smoke(tmp_path):
    """The conversion benchmark at its tiny size, one round with the online path: every
    phase gets a row and the export and online outputs equal the input tensor by tensor."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "benchmarks/convert.py", "--size", "tiny",
                           "--workdir", str(tmp_path), "--rounds", "1", "--online", "yes"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| phase")]
    assert rows == ["floor", "import", "export", "online"], proc.stdout
    assert ("export and online output identical to the input (torch.equal, dtype, keys), "
            "first round: True") in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the benchmark removes what it wrote
