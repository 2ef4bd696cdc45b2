"""The fine-tuning entry point on one CUDA GPU without Transformer Engine, as a user runs it
(``torchrun -m mbridge.train --recipe tiny_llama_finetune``, packed rows, bf16): the packed
rows attend through flash attention over ``cu_seqlens``, Adam is torch's fused kernel, the
loss falls, and a run resumed from its step-10 checkpoint continues as the uninterrupted run
does. Resuming failed here once: the fused kernel takes each step count on the GPU, the
restored state had it on the host (2026-12-04; ``fast_optimizer.fused_step_on_device``).
The losses compare at the log's four decimals within 1e-3 relative: flash attention's
backward sums in no fixed order."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HERE = Path(__file__).resolve().parent


def _train(work: Path, name: str, *overrides: str) -> dict[int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m",
           "mbridge.train", "--recipe", "tiny_llama_finetune",
           f"checkpoint.pretrained_checkpoint={work}/hf", f"data.dataset_root={work}/data",
           "train.micro_batch_size=1", "data.sft.pack=true", "logging.log_interval=1",
           "mixed_precision=bf16_mixed", f"logging.output_dir={work}/{name}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(m[1]): float(m[2])
            for m in re.finditer(r"^step (\d+)/\d+ \| loss ([0-9.]+)", proc.stdout, re.M)}


def test_packed_bf16_finetune_trains_and_resumes_on_gpu(tmp_path):
    sys.path[:0] = [str(HERE.parent), str(HERE.parent / "train")]
    from models import make_hf
    from sft_tokenizer import make_tokenizer
    from test_finetune import write_data

    make_hf("llama", tmp_path / "hf")
    make_tokenizer(tmp_path / "hf", "plain")
    write_data(tmp_path / "data")
    full = _train(tmp_path, "full")
    assert sorted(full) == list(range(1, 21)) and full[20] < full[1] - 2.0, full
    _train(tmp_path, "first", "train.exit_interval=10", f"checkpoint.save={tmp_path}/ckpt")
    resumed = _train(tmp_path, "resumed", f"checkpoint.load={tmp_path}/ckpt")
    assert sorted(resumed) == list(range(11, 21)), resumed
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-3), (step, loss, full[step])
