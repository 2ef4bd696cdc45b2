"""Tiny random LLaVA checkpoints for the vision-language tests: a transformers
``LlavaForConditionalGeneration`` (CLIP tower, MLP projector, Llama or Mistral decoder)
from a small config, every parameter drawn at random (norms around 1, biases non-zero),
saved with ``save_pretrained`` beside a real ``LlavaProcessor`` (a word-level tokenizer with
an ``<image>`` token and a chat template, a CLIP image processor that resizes every image
to the tower's 16 x 16), and a synthetic image-text set (PNG files of several sizes, one or
two per sample, and a JSONL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from models import randomize  # noqa: E402

WORDS = ("a photo of the cat dog red blue green square circle image shows what is in "
         "picture and two left right : ? . ,").split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
IMAGE_TOKEN = "<image>"
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {% for c in m.content %}"
            "{% if c.type == 'image' %}<image> {% else %}{{ c.text }} {% endif %}{% endfor %}"
            "<|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
TEXT = {"llama": dict(model_type="llama"),
        "mistral": dict(model_type="mistral", sliding_window=7, head_dim=16)}
PATCH, IMAGE = 4, 16


def vocab() -> dict[str, int]:
    return {w: i for i, w in enumerate(SPECIALS + WORDS)}


def llava_config(text: str = "llama", **overrides):
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig

    text_cfg = AutoConfig.for_model(**{
        **dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5), **TEXT[text]})
    vision_cfg = CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                  num_attention_heads=2, image_size=IMAGE, patch_size=PATCH,
                                  projection_dim=24)
    fields = dict(vision_config=vision_cfg, text_config=text_cfg,
                  image_token_index=vocab()[IMAGE_TOKEN], image_seq_length=(IMAGE // PATCH) ** 2,
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    fields.update(overrides)
    return LlavaConfig(**fields)


def make_processor(directory: Path, num_image_tokens: int | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=SPECIALS[4:])
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE},
                                crop_size={"height": IMAGE, "width": IMAGE})
    proc = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=TEMPLATE)
    proc.save_pretrained(directory)
    return proc


def make_llava(directory: Path, text: str = "llama", seed: int = 0, **overrides):
    """Build, randomize and save a tiny LLaVA with its processor; returns the model."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(text, **overrides))
    randomize(model, seed).eval()
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
        name = f"img{seed}_{k}.png"
        Image.fromarray(pixels).save(directory / name)
        names.append(name)
    return names


CAPTIONS = ["a photo of a red cat", "the image shows two blue squares", "a green circle",
            "a dog and a cat left and right", "what is in the picture ? a red square"]


PROMPTS = ["what is in the picture ?", "what is in the image ?"]


def make_dataset(directory: Path, samples: int = 8, seed: int = 0,
                 kind: str = "caption") -> Path:
    """``training.jsonl`` of records with one or two PNG images each, of different sizes
    (the processor resizes them): ``{"images", "text": "<image> caption"}`` (``caption``) or
    ``{"images", "prompt": "<image> question", "completion"}`` (``instruct``); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes = [(20, 16), (16, 24), (32, 32), (18, 22), (40, 20), (16, 16)]
    lines = []
    for i in range(samples):
        n = 1 + i % 2
        names = make_images(directory / "images", [sizes[(i + k) % len(sizes)]
                                                   for k in range(n)], seed=seed * 100 + i)
        images = " ".join([IMAGE_TOKEN] * n)
        record = {"images": [f"images/{name}" for name in names]}
        if kind == "caption":
            record["text"] = f"{images} {CAPTIONS[i % len(CAPTIONS)]}"
        else:
            record.update(prompt=f"{images} {PROMPTS[i % 2]}",
                          completion=CAPTIONS[i % len(CAPTIONS)])
        lines.append(json.dumps(record))
    path = directory / "training.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def hf_inputs(directory: Path, data: Path, rows: int = 2):
    """The processor's ``input_ids`` and ``pixel_values`` for the first ``rows`` records of
    ``data`` (padded to one length), as the parity tests feed both models."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(directory)
    records = [json.loads(x) for x in data.read_text().splitlines()[:rows]]
    images = [[Image.open(data.parent / p).convert("RGB") for p in r["images"]]
              for r in records]
    out = proc(text=[r.get("text") or r["prompt"] for r in records], images=images, padding=True,
               return_tensors="pt")
    return out["input_ids"], out["pixel_values"]


def hf_logits(directory: Path, input_ids, pixel_values) -> torch.Tensor:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values).logits
