"""The one rule for outputs (``mbridge.io.output``), through the CLI and the API:

- an existing target is refused unless told (``--overwrite`` / ``overwrite=True``, each
  message naming its own spelling);
- a target equal to, inside or above an input is refused even when told, and nothing is
  deleted (``save_hf_pretrained`` into the source model's parent, finding 4);
- ``--out .`` / ``--out ..`` with ``--overwrite``: a clear error, nothing left behind;
- the hidden partial output of a run killed with SIGKILL is removed by the next run;
- outputs get the umask's permissions, not 0700.
"""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from models import make_hf

from mbridge import AutoBridge, offline
from mbridge.cli import main
from mbridge.io.output import OutputError, OutputExists


def tree(directory: Path) -> dict:
    """Every path under ``directory`` with its bytes (None for directories)."""
    return {p.relative_to(directory): None if p.is_dir() else p.read_bytes()
            for p in sorted(directory.rglob("*"))}


def cli(*argv, cwd=None):
    """``python -m mbridge ...`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mbridge", *argv], capture_output=True,
                          text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    work = tmp_path_factory.mktemp("out")
    make_hf("llama", work / "hf")
    offline.import_hf(work / "hf", work / "mc")
    return work


def test_existing_target_is_refused_unless_told(models, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["convert", "import", "--hf", str(models / "hf"), "--out", str(target),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and "overwrite=True" not in err
    with pytest.raises(OutputExists, match=r"already exists; pass overwrite=True"):
        offline.export_hf(models / "mc", target)
    assert tree(target) == {Path("keep.txt"): b"mine"}
    assert main(["convert", "import", "--hf", str(models / "hf"), "--out", str(target),
                 "--quiet", "--overwrite"]) == 0
    assert (target / "metadata.json").is_file() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no hidden leftovers


@pytest.mark.parametrize("where", ["equal", "inside", "parent"])
def test_output_overlapping_the_input_is_refused_even_when_told(where, models, tmp_path,
                                                                capsys):
    src = tmp_path / "models" / "hf"
    src.parent.mkdir()
    shutil.copytree(models / "hf", src)
    (tmp_path / "models" / "notes.txt").write_text("unrelated")
    out = {"equal": src, "inside": src / "sub", "parent": src.parent}[where]
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(["convert", "import", "--hf", str(src), "--out", str(out), "--overwrite",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "overlaps input" in err and len(err.strip().splitlines()) == 1, err
    assert tree(tmp_path) == before


def test_save_hf_pretrained_never_deletes_its_source(models, tmp_path):
    """Finding 4: saving into the source model's parent deleted the model and a file."""
    src = tmp_path / "models" / "hf"
    src.parent.mkdir()
    shutil.copytree(models / "hf", src)
    (tmp_path / "models" / "notes.txt").write_text("unrelated")
    bridge = AutoBridge.from_hf_pretrained(src)
    model = bridge.to_megatron_provider().finalize().provide_distributed_model()
    before = tree(tmp_path)
    for target in (src.parent, src, src / "out"):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="overlaps input"):
                bridge.save_hf_pretrained(model, target, overwrite=overwrite)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(OutputExists, match="pass overwrite=True"):  # the default refuses
        bridge.save_hf_pretrained(model, tmp_path / "elsewhere")
    assert tree(tmp_path) == {**before, Path("elsewhere"): None}
    bridge.save_hf_pretrained(model, tmp_path / "elsewhere", overwrite=True)
    assert (tmp_path / "elsewhere" / "config.json").is_file()
    mc = AutoBridge.from_mcore_checkpoint(models / "mc")
    with pytest.raises(OutputError, match="overlaps input"):  # an mcore source too
        mc.save_hf_pretrained(model, models / "mc" / "hf_out")


@pytest.mark.parametrize("out", [".", ".."])
def test_out_dot_with_overwrite(out, models, tmp_path):
    """Finding 11: a clear error and nothing left behind, not a hidden finished copy."""
    cwd = tmp_path / "here"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    proc = cli("convert", "import", "--hf", str(models / "hf"), "--out", out, "--overwrite",
               "--quiet", cwd=cwd)
    assert proc.returncode == 2 and "the current directory or one above it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree(tmp_path) == before


def test_partial_output_of_a_killed_run_is_removed_by_the_next(big_model, tmp_path):
    """Finding 12: SIGKILL leaves the hidden partial directory; the next run removes it."""
    hf = big_model
    proc = subprocess.Popen([sys.executable, "-m", "mbridge", "convert", "import", "--hf",
                             str(hf), "--out", str(tmp_path / "mc"), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".mc.partial-*/*.distcp")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".mc.partial-*"))
    assert len(left) == 1 and not (tmp_path / "mc").exists()
    alive = tmp_path / f".mc.partial-{left[0].name.split('-')[1]}-{os.getpid()}-0"
    alive.mkdir()  # a live process's partial output (this test's) is left alone
    assert main(["convert", "import", "--hf", str(hf), "--out", str(tmp_path / "mc"),
                 "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "mc"])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_have_the_umasks_permissions(umask, models, tmp_path):
    """Finding 13: not 0700, so other users and jobs of a cluster can read them."""
    old = os.umask(umask)
    try:
        assert main(["convert", "import", "--hf", str(models / "hf"), "--out",
                     str(tmp_path / "mc"), "--quiet"]) == 0
        assert main(["convert", "export", "--mcore", str(tmp_path / "mc"), "--out",
                     str(tmp_path / "hf"), "--quiet"]) == 0
    finally:
        os.umask(old)
    for out in (tmp_path / "mc", tmp_path / "hf"):
        for p in [out, *out.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(p.stat().st_mode) == want, p
