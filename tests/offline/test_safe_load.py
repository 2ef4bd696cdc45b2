"""Loading a checkpoint runs no code from it (``mbridge.io.safe_load``).

A planted checkpoint is a real one (``convert import``, or a training save directory) with
one pickle replaced by one that runs ``touch MARKER`` when unpickled the ordinary way: the
DCP ``.metadata``, ``common.pt``, or an object record inside a ``.distcp``. Every way a
user loads a checkpoint refuses it (exit 2 in the CLI, CheckpointError in the API, exit 2
from ``mbridge.train``) and the marker never appears.
"""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_util import user_env
from models import make_hf

from mbridge import AutoBridge, offline
from mbridge.cli import main
from mbridge.io.hf import CheckpointError
from mbridge.io.safe_load import read_metadata
from mbridge.shell import checkpoint


class RunsCommand:
    """Unpickled the ordinary way, runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plain_metadata(d: Path):
    with open(d / ".metadata", "rb") as f:
        return pickle.load(f)  # a real checkpoint of our own, before planting


def plant_metadata(d: Path, marker: Path) -> None:
    md = _plain_metadata(d)
    md.planner_data = RunsCommand(marker)
    (d / ".metadata").write_bytes(pickle.dumps(md))


def plant_common(d: Path, marker: Path) -> None:
    common = torch.load(d / "common.pt", weights_only=True)
    torch.save({**common, "payload": RunsCommand(marker)}, d / "common.pt")


def plant_object(d: Path, marker: Path) -> None:
    """An object record (e.g. ``_extra_state``) pointed at a new record that runs code."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = _plain_metadata(d)
    key = next(k for k, v in md.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata))
    index = next(i for i in md.storage_data if i.fqn == key)
    name = md.storage_data[index].relative_path
    with open(d / name, "ab") as f:
        offset = f.tell()
        torch.save([RunsCommand(marker)], f)
        length = f.tell() - offset
    md.storage_data[index] = _StorageInfo(name, offset, length)
    (d / ".metadata").write_bytes(pickle.dumps(md))


PLANTS = {".metadata": plant_metadata, "common.pt": plant_common, "object record": plant_object}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    work = tmp_path_factory.mktemp("safe")
    make_hf("llama", work / "hf")
    offline.import_hf(work / "hf", work / "mc")
    return work


def planted(imported: Path, tmp_path: Path, where: str) -> tuple[Path, Path]:
    d = shutil.copytree(imported / "mc", tmp_path / "planted")
    marker = tmp_path / "MARKER"
    PLANTS[where](d, marker)
    return d, marker


@pytest.mark.parametrize("where", sorted(PLANTS))
def test_planted_checkpoint_is_refused_by_the_cli(where, imported, tmp_path, capsys):
    d, marker = planted(imported, tmp_path, where)
    for argv in (["convert", "export", "--mcore", str(d), "--out", str(tmp_path / "out")],
                 ["convert", "verify", "--hf", str(imported / "hf"), "--mcore", str(d)]):
        capsys.readouterr()
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert "would run code" in err and "Traceback" not in err, err
        assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", sorted(PLANTS))
def test_planted_checkpoint_is_refused_by_the_api(where, imported, tmp_path):
    d, marker = planted(imported, tmp_path, where)
    with pytest.raises(CheckpointError, match="would run code"):
        AutoBridge.from_mcore_checkpoint(d)
    with pytest.raises(CheckpointError, match="would run code"):
        checkpoint.check_readable(d)
    assert not marker.exists()


def test_metadata_planted_after_opening_is_refused_on_load(imported, tmp_path):
    """Megatron-Core's loader unpickles ``.metadata`` itself: it is checked again right
    before, so a checkpoint changed between open and load is refused too."""
    d = shutil.copytree(imported / "mc", tmp_path / "mc")
    bridge = AutoBridge.from_mcore_checkpoint(d)
    plant_metadata(d, tmp_path / "MARKER")
    provider = bridge.to_megatron_provider().finalize()
    with pytest.raises(CheckpointError, match="would run code"):
        provider.provide_distributed_model()
    assert not (tmp_path / "MARKER").exists()


def test_allow_list_reads_real_metadata(imported):
    """The allow-list unpickler gives what the plain unpickler gives, on a real checkpoint."""
    assert read_metadata(imported / "mc") == _plain_metadata(imported / "mc")


def test_training_resume_refuses_a_planted_checkpoint(imported, tmp_path):
    """``mbridge.train`` with ``checkpoint.load`` at a save directory whose newest checkpoint
    was planted: exit 2 with a one-line message, before any rank unpickles it."""
    save = tmp_path / "save"
    d = shutil.copytree(imported / "mc", save / "iter_0000004")
    (save / "latest_checkpointed_iteration.txt").write_text("4\n")
    plant_metadata(d, tmp_path / "MARKER")
    cmd = [sys.executable, "-m", "mbridge.train", "--recipe", "tiny_llama_pretrain",
           f"checkpoint.load={save}", f"logging.output_dir={tmp_path / 'log'}"]
    proc = subprocess.run(cmd, env=user_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "would run code" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "MARKER").exists()
