"""Image-text datasets from ``data.dataset_root`` for vision-language models (LLaVA,
Qwen2.5-VL), made into samples through the model's own HF processor by the pure rules of
``mbridge.train.image_text``.

The processor (``AutoProcessor``: tokenizer, image processor, placeholder expansion) comes
from ``data.tokenizer`` or the checkpoint's directory, which must hold its files
(``processor_config.json`` or ``preprocessor_config.json``). Every record is checked when
the datasets are built, before any model: its images open, its text holds one image token
per image, and the processor expands them into exactly the features the vision tower makes.
Images are decoded again when a micro-batch is collated (``pixel_values`` of every image
of the micro-batch, in token order, and for Qwen2.5-VL their ``image_grid_thw``), so memory
holds tokens, not pixels. Qwen2.5-VL's processor is ``GridProcessor``: its tokenizer and
image processor with ``Qwen2_5_VLProcessor``'s expansion, which transformers 5 cannot build
without torchvision.

    train, valid, test = build_datasets(context)    # the provider pretrain() picks
"""

from __future__ import annotations

from pathlib import Path

import torch

from mbridge.shell import sft as shell_sft
from mbridge.specs import ModelSpec
from mbridge.train import image_text, sft
from mbridge.train.config import ConfigError
from mbridge.train.sft import SFTDataError

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def check_processor(path: Path | None) -> None:
    """ConfigError unless ``path`` holds a processor's files."""
    if path is None or not any((Path(path) / n).is_file() for n in PROCESSOR_FILES):
        raise ConfigError(f"{path} holds no {' or '.join(PROCESSOR_FILES)}: a vision-language "
                          "model's data is made by its HF processor (image resizing, image "
                          "token expansion); save it beside the weights "
                          "(processor.save_pretrained) or set data.tokenizer to a directory "
                          "holding one")


class GridProcessor:
    """Qwen2.5-VL's processor as ``Qwen2_5_VLProcessor`` works for images: the image
    processor's ``pixel_values`` and ``image_grid_thw``, each ``<|image_pad|>`` of the text
    repeated ``t * h * w / merge_size ** 2`` times (``replace_image_token``), then the
    tokenizer. ``Qwen2_5_VLProcessor`` itself needs torchvision in transformers 5 (its
    video processor), which images do not."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, *, text: list[str], images) -> dict:
        vis = self.image_processor(images=images, return_tensors="pt")
        grids = iter(vis["image_grid_thw"].tolist())
        merge = self.image_processor.merge_size ** 2

        def expand(t: str) -> str:
            first, *rest = t.split(self.image_token)
            for part in rest:
                g = next(grids)
                first += self.image_token * (g[0] * g[1] * g[2] // merge) + part
            return first

        return {"input_ids": self.tokenizer([expand(t) for t in text])["input_ids"], **vis}


def load_processor(path: Path, spec: ModelSpec | None = None):
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    check_processor(path)
    try:
        if spec is not None and spec.vision is not None and spec.vision.tower == "qwen2_5_vl":
            return GridProcessor(AutoTokenizer.from_pretrained(str(path)),
                                 AutoImageProcessor.from_pretrained(str(path)))
        return AutoProcessor.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError, ValueError, ... by case
        raise ConfigError(f"cannot load an HF processor from {path}: {e}") from None


def _open(root: Path, paths):
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(root / p) as im:
                out.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise SFTDataError(f"image {p}: {e}") from None
    return out


def encode(record, proc, root: Path, spec: ModelSpec) -> tuple[list[int], list[bool]]:
    """(tokens, loss mask) of one record (``train.image_text.record_parts``), EOS last."""
    v = spec.vision
    paths, prompt, completion = image_text.record_parts(record)
    tok = proc.tokenizer
    token = getattr(proc, "image_token", "<image>")
    if image_text.count_placeholders(completion, token) and prompt:
        raise SFTDataError(f"the completion holds the image token {token!r}; put images in "
                           "the prompt")
    text = prompt or completion
    if image_text.count_placeholders(text, token) != len(paths):
        raise SFTDataError(f"the text holds {image_text.count_placeholders(text, token)} image "
                           f"token(s) {token!r} for {len(paths)} image(s)")
    enc = proc(text=[text], images=_open(root, paths))
    ids = list(enc["input_ids"][0])
    prompt_tokens = len(ids) if prompt else 0
    if prompt:
        ids += tok(completion, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    if v.image_size is None:  # images at their own size: features from each one's grid
        image_text.check_patches(enc["pixel_values"].shape[-1], channels=v.num_channels,
                                 temporal=v.temporal_patch_size, patch=v.patch_size)
        counts = [v.tokens_for_grid(tuple(g)) for g in enc["image_grid_thw"].tolist()]
    else:
        counts = v.tokens_per_image
    image_text.check_image_tokens(ids, images=len(paths), tokens_per_image=counts,
                                  image_token_id=v.image_token_id)
    return image_text.image_text_sample(ids, prompt_tokens=prompt_tokens,
                                        image_token_id=v.image_token_id)


class ImageTextDataset:
    """``dataset[i]``: one sample's unpadded ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids`` and its ``images`` (paths); ``collate`` pads a micro-batch to
    ``seq_length`` and adds the ``pixel_values`` of its images."""

    def __init__(self, samples, *, root: Path, image_processor, pad_id: int, seq_length: int):
        self.samples, self.root, self.image_processor = samples, root, image_processor
        self.pad_id, self.seq_length = pad_id, seq_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        tokens, mask, images = self.samples[i]
        inputs, labels, loss_mask = sft.shift(tokens, mask)
        return {"tokens": inputs, "labels": labels, "loss_mask": loss_mask,
                "position_ids": list(range(len(inputs))), "images": images}

    def collate(self, items) -> dict[str, torch.Tensor]:
        n = self.seq_length
        fill = {"tokens": self.pad_id, "labels": self.pad_id, "loss_mask": 0, "position_ids": 0}
        out = {k: torch.tensor([sft.pad(x[k], n, v) for x in items], dtype=torch.long)
               for k, v in fill.items()}
        images = _open(self.root, [p for x in items for p in x["images"]])
        vis = self.image_processor(images=images, return_tensors="pt")
        out["pixel_values"] = vis["pixel_values"]
        if "image_grid_thw" in vis:  # images at their own size (Qwen2.5-VL)
            out["image_grid_thw"] = vis["image_grid_thw"]
        return out


def read_split(path: Path, proc, spec: ModelSpec, seq_length: int):
    samples = []
    for n, record, tokens, mask in shell_sft.encoded_records(
            path, lambda r: encode(r, proc, path.parent, spec)):
        if len(tokens) > seq_length + 1:
            raise ConfigError(f"{path}:{n}: {len(tokens)} tokens (images expanded), more "
                              f"than model.seq_length={seq_length} + 1; image tokens "
                              "cannot be cut: raise model.seq_length")
        samples.append((tokens, mask, tuple(record["images"])))
    return samples


def build_datasets(context):
    """The provider for a vision-language model's ``data.dataset_root``: (train, valid or
    None, None)."""
    cfg = context.config
    root, n = Path(cfg.data.dataset_root), cfg.model.seq_length
    proc = load_processor(context.tokenizer_dir, context.spec)
    tok = proc.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out = []
    for split in sft.SPLITS[:2]:
        path = root / f"{split}.jsonl"
        if not path.is_file():
            out.append(None)
            continue
        samples = read_split(path, proc, context.spec, n)
        if not samples:
            raise ConfigError(f"{path}: no sample")
        images = sum(len(s[2]) for s in samples)
        context.note(f"{path.name}: {len(samples)} image-text samples, {images} images")
        out.append(ImageTextDataset(samples, root=root, image_processor=proc.image_processor,
                                    pad_id=pad_id, seq_length=n))
    if out[1] is None and cfg.train.eval_iters:
        raise ConfigError(f"data.dataset_root={root} has no validation.jsonl but "
                          f"train.eval_iters={cfg.train.eval_iters}; add one or set "
                          "train.eval_iters=0")
    return out[0], out[1], None


__all__ = ["GridProcessor", "ImageTextDataset", "build_datasets", "check_processor", "encode",
           "load_processor"]
