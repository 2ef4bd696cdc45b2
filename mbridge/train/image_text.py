"""Image-text samples for vision-language training (pure: no files, no processor).

A record is one JSON object a line of ``data.dataset_root``'s ``training.jsonl`` (and
``validation.jsonl``) with ``images``, a list of image files relative to the root, and
either ``text`` (a caption: every text token is scored) or ``prompt`` and ``completion``
(instruction data: only the completion is scored). The text holds the processor's image
token (``<image>``) once per image, where the image goes; the processor expands each into
the model's ``tokens_per_image`` placeholders, which the projected features replace: as
labels they are nothing to predict, so the loss mask drops them (the loss is on text
tokens only).

    tokens, mask = image_text_sample(ids, prompt_tokens=0, image_token_id=32000)
    check_image_tokens(ids, images=2, tokens_per_image=576, image_token_id=32000)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mbridge.train.sft import SFTDataError


def record_parts(record: dict[str, Any]) -> tuple[list[str], str, str]:
    """``(images, prompt, completion)`` of a record: ``text`` records have an empty prompt
    (everything is the completion). SFTDataError naming what is missing or misshapen."""
    images = record.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise SFTDataError("an image-text record needs 'images': a non-empty list of image "
                           "file paths (relative to data.dataset_root)")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise SFTDataError("'text' must be a string")
        return images, "", record["text"]
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise SFTDataError("an image-text record needs 'text' (a caption) or 'prompt' and "
                           "'completion' (strings)")
    return images, prompt, completion


def count_placeholders(text: str, image_token: str) -> int:
    return text.count(image_token)


def check_image_tokens(ids: Sequence[int], *, images: int,
                       tokens_per_image: int | Sequence[int], image_token_id: int) -> None:
    """SFTDataError unless ``ids`` hold exactly as many placeholder tokens as the images
    have features (``tokens_per_image``: one count for every image, or one per image, as
    for images at their own size): the model replaces each by one row of features."""
    have = sum(1 for t in ids if t == image_token_id)
    counts = [tokens_per_image] * images if isinstance(tokens_per_image, int) \
        else list(tokens_per_image)
    want = sum(counts)
    if have != want:
        each = f"{counts[0]} features each" if len(set(counts)) == 1 else \
            f"{', '.join(map(str, counts))} features"
        raise SFTDataError(f"{have} image tokens (id {image_token_id}) for {images} image(s) of "
                           f"{each} ({want} expected): the text "
                           "needs one image token per image, and the processor must expand "
                           "it as the model's vision tower counts features (patch size, CLS, "
                           "spatial merge)")


def check_patches(width: int, *, channels: int, temporal: int, patch: int) -> None:
    """SFTDataError unless an image processor's patch rows ``[patches, width]`` are the
    tower's: ``channels * temporal * patch ** 2`` values each (Qwen2.5-VL)."""
    want = channels * temporal * patch ** 2
    if width != want:
        raise SFTDataError(f"the image processor gives patches of {width} values; the vision "
                           f"tower takes {channels} channels x {temporal} frames x "
                           f"{patch}x{patch} pixels = {want}: its patch_size or "
                           "temporal_patch_size disagrees with the model's")


def image_text_sample(ids: Sequence[int], *, prompt_tokens: int,
                      image_token_id: int) -> tuple[list[int], list[bool]]:
    """(tokens, loss mask) of one sample: the first ``prompt_tokens`` tokens and every image
    placeholder are not scored. ``([5, 9, 9, 7, 8], prompt_tokens=1, image_token_id=9)`` ->
    ``([5, 9, 9, 7, 8], [False, False, False, True, True])``."""
    mask = [i >= prompt_tokens and t != image_token_id for i, t in enumerate(ids)]
    return list(ids), mask


__all__ = ["check_image_tokens", "check_patches", "count_placeholders", "image_text_sample",
           "record_parts"]
