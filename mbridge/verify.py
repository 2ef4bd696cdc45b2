"""Check a conversion: every tensor of an HF checkpoint against a Megatron-Core distributed
checkpoint mapped back to HF (bit for bit), and optionally the fp32 logits of both models.

    from mbridge import verify
    report = verify.verify("hf_dir", "mcore_dir", logits=True)
    assert report.passed, report

CLI: ``mbridge convert verify --hf HF_DIR --mcore MCORE_DIR [--logits]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from mbridge import config as mconfig
from mbridge import keys
from mbridge.architectures import registry
from mbridge.bridge import AutoBridge
from mbridge.io.checks import check_hf, open_mcore
from mbridge.io.hf import HFCheckpoint
from mbridge.offline import progress_bar, read_mcore_group
from mbridge.sharding.dist_checkpoint import checkpoint_key
from mbridge.shell import forward
from mbridge.specs import ModelSpec, differences


@dataclass
class VerifyReport:
    """What ``verify`` found. ``cast``: tensors equal only after casting the HF tensor to the
    checkpoint's dtype (an import with ``dtype``); ``mismatches``: (name, max |diff|);
    ``unused``: HF tensors the model does not use (import leaves them out)."""

    tensors: int = 0
    identical: int = 0
    cast: list[str] = field(default_factory=list)
    mismatches: list[tuple[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    logits_diff: float | None = None
    atol: float = 1e-4

    @property
    def passed(self) -> bool:
        logits_ok = self.logits_diff is None or self.logits_diff <= self.atol
        return not self.mismatches and not self.problems and logits_ok


def verify(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, *, logits: bool = False,
           atol: float = 1e-4, progress: bool = False) -> VerifyReport:
    """Compare every tensor of ``hf_dir`` with the distributed checkpoint mapped back to HF
    (bit for bit), and with ``logits`` the fp32 logits of both models on CPU (max |diff| <=
    ``atol``; instantiates both models: about 8 bytes per parameter)."""
    ckpt = HFCheckpoint(hf_dir)
    reader, _, spec, groups = open_mcore(mcore_dir)
    report = VerifyReport(atol=atol)
    hf_spec = mconfig.from_hf_config(ckpt.config)
    if hf_spec != spec:
        report.problems.append("configs differ (HF vs checkpoint): "
                               + "; ".join(differences(hf_spec, spec)))
        return report
    arch = registry.get(spec.architecture)
    groups = arch.mapping(spec, **arch.options_for(ckpt.keys()))  # read as hf_dir stores it
    report.unused = check_hf(ckpt, groups, spec)
    total = sum(ckpt.nbytes(k) for g in groups for k in g.hf_keys)
    with progress_bar(progress, total, "verify") as bar:
        for group in groups:
            back = group.to_hf(read_mcore_group(reader, group, spec))
            for key, mine in back.items():
                _compare(report, key, ckpt.read(key), mine)
                bar.update(ckpt.nbytes(key))
            ckpt.close()
    if logits:
        dtype = reader.dtype(checkpoint_key(keys.EMBEDDING, spec))
        report.logits_diff = logits_diff(hf_dir, mcore_dir, spec, dtype)
    return report


def _compare(report: VerifyReport, key: str, hf: torch.Tensor, mine: torch.Tensor) -> None:
    report.tensors += 1
    if hf.dtype == mine.dtype and torch.equal(hf, mine):
        report.identical += 1
    elif torch.equal(hf.to(mine.dtype), mine):
        report.cast.append(key)
    else:
        report.mismatches.append((key, (hf.float() - mine.float()).abs().max().item()))


def logits_diff(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, spec: ModelSpec,
                dtype: torch.dtype = torch.float32, batch: int = 2, seq: int = 16) -> float:
    """Max |diff| of fp32 logits: HF ``transformers`` model vs the Megatron-Core model loaded
    from the distributed checkpoint at TP=1 in this process, on random token ids. The HF
    weights are rounded to ``dtype`` (the checkpoint's) first, so both hold the same values."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen)
    inputs = {}
    if spec.vision is not None:  # one random image per row, its tokens first
        inputs = random_images(spec.vision, batch, gen)
        v, tokens = spec.vision, inputs.pop("tokens_per_image")
        ids[ids == v.image_token_id] = (v.image_token_id + 1) % spec.vocab_size
        ids = torch.cat([torch.full((batch, tokens), v.image_token_id), ids], 1)
    provider = AutoBridge.from_mcore_checkpoint(mcore_dir).to_megatron_provider()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Megatron-Core's and DCP's deprecation notices
        model = provider.finalize().provide_distributed_model()
    got = forward.logits(model, ids, provider.parallel_spec(), spec.vocab_size, spec.hidden_size,
                         **inputs)
    del model
    auto = AutoModelForCausalLM if spec.vision is None else AutoModelForImageTextToText
    hf = auto.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").float().eval()
    if "image_grid_thw" in inputs:  # Qwen2.5-VL's rope index reads the image tokens' type
        inputs["mm_token_type_ids"] = (ids == spec.vision.image_token_id).int()
    with torch.no_grad():
        ref = hf(input_ids=ids, **inputs).logits
    return (got - ref).abs().max().item()


def random_images(vision, batch: int, gen: torch.Generator) -> dict:
    """``batch`` random images as the model's image processor gives them, and
    ``tokens_per_image``: CLIP's ``[batch, channels, size, size]``; Qwen2.5-VL's patches
    ``[batch * h * w, channels * temporal * patch ** 2]`` on grids of 2x2 merged features
    (``image_grid_thw``)."""
    if vision.tower == "clip":
        size = vision.image_size
        return dict(pixel_values=torch.randn(batch, vision.num_channels, size, size,
                                             generator=gen),
                    tokens_per_image=vision.tokens_per_image)
    side = 2 * vision.spatial_merge_size
    width = vision.num_channels * vision.temporal_patch_size * vision.patch_size ** 2
    grid = (1, side, side)
    return dict(pixel_values=torch.randn(batch * side * side, width, generator=gen),
                image_grid_thw=torch.tensor([grid] * batch),
                tokens_per_image=vision.tokens_for_grid(grid))
