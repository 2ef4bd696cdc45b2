"""A Hugging Face hub cache snapshot loads everywhere an HF directory does.

The hub stores every file once under ``models--org--name/blobs/<sha256>`` and makes each
revision a directory of relative symlinks into it (``snapshots/<rev>/config.json ->
../../blobs/<sha256>``). The test builds that layout from a real sharded model and
converts it with ``mbridge convert import``, opens it with ``AutoBridge.from_hf_pretrained``
and trains from it with ``model.hf_path``; path traversal through the index json and
symlinks leading out of the repo cache are still refused.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dist_util import user_env
from models import make_hf

from mbridge import AutoBridge, offline
from mbridge.cli import main
from mbridge.io.hf import INDEX, CheckpointError, HFCheckpoint

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(model_dir: Path, cache: Path, repo: str = "models--tiny--llama") -> Path:
    """``model_dir`` laid out as the hub cache does; returns the snapshot directory."""
    blobs, snap = cache / repo / "blobs", cache / repo / "snapshots" / REV
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (cache / repo / "refs").mkdir()
    (cache / repo / "refs" / "main").write_text(REV)
    for f in sorted(model_dir.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blobs / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    work = tmp_path_factory.mktemp("hub")
    make_hf("llama", work / "hf")
    offline.import_hf(work / "hf", work / "mc")
    offline.export_hf(work / "mc", work / "sharded", shard_size="60KB")  # several shards
    snap = hub_snapshot(work / "sharded", work / "cache")
    assert (snap / INDEX).is_symlink() and len(list(snap.glob("model-*.safetensors"))) > 2
    return work, snap


def test_convert_import_and_verify(snapshot, tmp_path, capsys):
    work, snap = snapshot
    assert main(["convert", "import", "--hf", str(snap), "--out", str(tmp_path / "mc"),
                 "--quiet"]) == 0
    assert main(["convert", "verify", "--hf", str(work / "hf"), "--mcore", str(tmp_path / "mc"),
                 "--quiet"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_from_hf_pretrained_matches_transformers(snapshot):
    from transformers import AutoModelForCausalLM

    work, snap = snapshot
    bridge = AutoBridge.from_hf_pretrained(snap)
    reference = AutoModelForCausalLM.from_pretrained(snap)  # transformers loads it too
    assert set(bridge.checkpoint.keys()) == set(reference.state_dict())
    assert bridge.spec == AutoBridge.from_hf_pretrained(work / "hf").spec


def test_model_hf_path(snapshot, tmp_path):
    _, snap = snapshot
    cmd = [sys.executable, "-m", "mbridge.train", "--recipe", "tiny_llama_pretrain",
           f"model.hf_path={snap}", "model.spec=null", "train.train_iters=2",
           "scheduler.lr_warmup_iters=0", f"logging.output_dir={tmp_path}"]
    # a fresh one-rank world, not the one an in-process test of this session started
    for _ in range(3):  # the free port it picks can be taken first on a busy machine
        proc = subprocess.run(cmd, env=user_env(OMP_NUM_THREADS="1"),  # as a user would
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        if "EADDRINUSE" not in proc.stderr and "address already in use" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step 2/2 | loss" in proc.stdout


def test_traversal_and_symlinks_out_of_the_repo_are_refused(snapshot, tmp_path):
    work, _ = snapshot
    snap = hub_snapshot(work / "sharded", tmp_path / "cache")
    index = json.loads((snap / INDEX).read_text())
    key = "model.norm.weight"
    shard = index["weight_map"][key]
    # "../../blobs/<hash>" lands in the repo cache, but an index may not climb out at all
    edited = dict(index, weight_map={**index["weight_map"],
                                     key: os.readlink(snap / shard)})
    (snap / INDEX).unlink()
    (snap / INDEX).write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="a path outside"):
        HFCheckpoint(snap)
    (snap / INDEX).write_text(json.dumps(dict(index, weight_map={
        **index["weight_map"], key: "../../../../../../../../etc/passwd"})))
    with pytest.raises(CheckpointError, match="a path outside"):
        HFCheckpoint(snap)
    (snap / INDEX).write_text(json.dumps(index))
    HFCheckpoint(snap)  # the unedited index loads
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(snap / shard, elsewhere)
    (snap / shard).unlink()
    (snap / shard).symlink_to(elsewhere)  # a symlink out of the repo cache
    with pytest.raises(CheckpointError, match="a symlink to .* a path outside"):
        HFCheckpoint(snap)
