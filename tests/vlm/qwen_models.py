"""Tiny random Qwen2.5-VL checkpoints for the vision-language tests: a transformers
``Qwen2_5_VLForConditionalGeneration`` (a 3-block window-attention tower with one
full-attention block and a 2x2 patch merger, a Qwen2 decoder with q/k/v biases and
multimodal rope of non-default theta) from a small config, every parameter drawn at random,
saved with ``save_pretrained`` beside its processor files: a word-level tokenizer with
Qwen's vision tokens and the real ``Qwen2VLImageProcessor`` (4-pixel patches, images
resized to multiples of 8 pixels at their own aspect ratio).

``Qwen2_5_VLProcessor`` itself cannot be built here: transformers 5 checks its video
processor against ``BaseVideoProcessor``, which needs torchvision. ``hf_inputs`` therefore
does what the processor does (``Qwen2_5_VLProcessor.replace_image_token``): each
``<|image_pad|>`` expanded to ``t * h * w / merge ** 2`` copies from the image processor's
``image_grid_thw``, and ``mm_token_type_ids`` marking them for HF's rope index.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from models import randomize  # noqa: E402

WORDS = ("a photo of the cat dog red blue green square circle image shows what is in "
         "picture and two left right : ? . ,").split()
SPECIALS = ["<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_TOKEN = "<|image_pad|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PATCH, MERGE = 4, 2


def vocab() -> dict[str, int]:
    return {w: i for i, w in enumerate(SPECIALS + WORDS)}


def vision_config(**overrides) -> dict:
    return {**dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2,
                   patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                   window_size=16, fullatt_block_indexes=[1], out_hidden_size=32,
                   in_channels=3, hidden_act="silu"), **overrides}


def qwen_config(**overrides):
    from transformers import Qwen2_5_VLConfig

    v = vocab()
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=v["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 50000.0,
                                 "mrope_section": [2, 1, 1]})
    fields = dict(text_config=text, vision_config=vision_config(),
                  image_token_id=v[IMAGE_TOKEN], video_token_id=v["<|video_pad|>"],
                  vision_start_token_id=v["<|vision_start|>"],
                  vision_end_token_id=v["<|vision_end|>"])
    fields.update(overrides)
    return Qwen2_5_VLConfig(**fields)


def make_processor(directory: Path) -> None:
    """The tokenizer and image processor files ``Qwen2_5_VLProcessor`` reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="<|endoftext|>",
                            additional_special_tokens=SPECIALS[3:]).save_pretrained(directory)
    Qwen2VLImageProcessorPil(patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE,
                             min_pixels=8 * 8, max_pixels=48 * 48).save_pretrained(directory)


def make_qwen(directory: Path, seed: int = 0, **overrides):
    """Build, randomize and save a tiny Qwen2.5-VL with its processor files."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen_config(**overrides))
    randomize(model, seed).eval()
    with torch.no_grad():  # the merger's norm around 1 too, so the features matter
        model.model.visual.merger.ln_q.weight.add_(1.0)
    model.save_pretrained(directory)
    make_processor(directory)
    return model


def make_images(directory: Path, sizes, seed: int = 0) -> list[str]:
    """Random RGB PNG files of the given (width, height); returns their file names."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for k, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        names.append(f"img{seed}_{k}.png")
        Image.fromarray(pixels).save(directory / names[-1])
    return names


CAPTIONS = ["a photo of a red cat", "the image shows two blue squares", "a green circle",
            "a dog and a cat left and right"]
# grids (h, w) in patches: (4, 4), (4, 8), (8, 8), (6, 10), (10, 6), (8, 4)
SIZES = [(16, 16), (32, 16), (32, 32), (40, 24), (24, 40), (16, 32)]


def make_dataset(directory: Path, samples: int = 8, seed: int = 0) -> Path:
    """``training.jsonl`` of caption records with one or two PNG images each, of
    different sizes and aspect ratios; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(samples):
        n = 1 + i % 2
        names = make_images(directory / "images",
                            [SIZES[(i + 2 * k) % len(SIZES)] for k in range(n)],
                            seed=seed * 100 + i)
        text = " ".join([IMAGE] * n) + " " + CAPTIONS[i % len(CAPTIONS)]
        lines.append(json.dumps({"images": [f"images/{x}" for x in names], "text": text}))
    path = directory / "training.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def expand(ids: list[int], grids: list[tuple[int, int, int]], image_id: int) -> list[int]:
    """Each image token repeated for its image's features (the processor's expansion)."""
    out, k = [], 0
    for t in ids:
        if t == image_id:
            g = grids[k]
            k += 1
            out += [image_id] * (g[0] * g[1] * g[2] // MERGE ** 2)
        else:
            out.append(t)
    return out


def hf_inputs(directory: Path, data: Path, rows: int = 2):
    """``input_ids`` (right-padded), ``pixel_values`` and ``image_grid_thw`` of the first
    ``rows`` records of ``data``, as the processor makes them."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    images = AutoImageProcessor.from_pretrained(directory)
    records = [json.loads(x) for x in data.read_text().splitlines()[:rows]]
    pics = [Image.open(data.parent / p).convert("RGB") for r in records for p in r["images"]]
    vis = images(images=pics, return_tensors="pt")
    grids = [tuple(int(x) for x in g) for g in vis["image_grid_thw"]]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    seqs, k = [], 0
    for r in records:
        n = len(r["images"])
        seqs.append(expand(tok(r["text"])["input_ids"], grids[k:k + n], image_id))
        k += n
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    return ids, vis["pixel_values"], vis["image_grid_thw"]


def hf_logits(directory: Path, input_ids, pixel_values, image_grid_thw) -> torch.Tensor:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32).eval()
    types = (input_ids == model.config.image_token_id).int()
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values,
                     image_grid_thw=image_grid_thw, mm_token_type_ids=types).logits
