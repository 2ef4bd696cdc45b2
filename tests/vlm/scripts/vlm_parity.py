"""Launched by tests/vlm under torchrun: for every layout, import the tiny LLaVA or Qwen2.5-VL
(by HF_DIR's architecture) into Megatron-Core, compare the logits of a batch of images and
text with HF's, export it back with ``save_hf_pretrained`` and compare every tensor (vision
tower and projector included) and the processor files with the input. With MCORE_DIR (an
offline ``mbridge convert import`` of HF_DIR) the model is loaded from it too. One RESULT
line per rank, layout and source.

usage: vlm_parity.py OUT_DIR HF_DIR DATA_JSONL LAYOUT[;LAYOUT...] [MCORE_DIR]
(LAYOUT: "tp=2", "pp=2")
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/vlm: llava_models, qwen_models

import importlib  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from dist_util import report  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mbridge import AutoBridge  # noqa: E402
from mbridge.io.hf import SIDE_FILES  # noqa: E402
from mbridge.shell import forward  # noqa: E402

NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size"}
# architecture -> (test model module, the model inputs its hf_inputs returns after input_ids,
# the HF prefix of the vision tower)
FAMILIES = {"LlavaForConditionalGeneration": ("llava_models", ("pixel_values",),
                                              "vision_tower."),
            "Qwen2_5_VLForConditionalGeneration": ("qwen_models",
                                                   ("pixel_values", "image_grid_thw"),
                                                   "visual.")}


def tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check(layout: str, hf_dir: Path, data: Path, out_root: Path, source: Path) -> dict:
    bridge = (AutoBridge.from_hf_pretrained(hf_dir) if source == hf_dir
              else AutoBridge.from_megatron_checkpoint(source))
    provider = bridge.to_megatron_provider()
    for item in layout.split(","):
        key, value = item.split("=")
        setattr(provider, NAMES[key], int(value))
    provider.finalize()
    model = provider.provide_distributed_model()
    spec = bridge.spec
    name, input_names, vision_prefix = FAMILIES[
        json.loads((hf_dir / "config.json").read_text())["architectures"][0]]
    family = importlib.import_module(name)
    ids, *rest = family.hf_inputs(hf_dir, data)
    ref = family.hf_logits(hf_dir, ids, *rest)
    got = forward.logits(model, ids, provider.parallel_spec(), spec.vocab_size,
                         spec.hidden_size, **dict(zip(input_names, rest)))
    names = [name for name, _ in bridge.export_hf_weights(model)]
    out_dir = out_root / (layout.replace(",", "_").replace("=", "") + "-" + source.name)
    bridge.save_hf_pretrained(model, out_dir, shard_size="20KB")
    src, dst = tensors(hf_dir), tensors(out_dir)
    exact = sorted(src) == sorted(dst) and all(
        torch.equal(src[k], dst[k]) and src[k].dtype == dst[k].dtype for k in src)
    side = [n for n in SIDE_FILES if (hf_dir / n).is_file()]
    side_same = all((out_dir / n).read_bytes() == (hf_dir / n).read_bytes() for n in side)
    return dict(layout=layout, source=source.name, logits_diff=(got - ref).abs().max().item(),
                exact=exact,
                n_tensors=len(src), n_vision=sum(k.startswith(vision_prefix) for k in dst),
                export_names=sorted(names) == sorted(src), side=side, side_same=side_same,
                image_tokens=int((ids == spec.vision.image_token_id).sum()))


def main():
    out_root, hf_dir, data = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sources = [hf_dir] + [Path(p) for p in sys.argv[5:]]
    for layout in sys.argv[4].split(";"):
        for source in sources:
            report(**check(layout, hf_dir, data, out_root, source))


if __name__ == "__main__":
    main()
