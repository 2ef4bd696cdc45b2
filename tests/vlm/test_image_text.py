"""The pure rules of image-text samples (``mbridge.train.image_text``) and the run-config
checks of vision-language training (``shell.pretrain.check_vision``), without a model."""

from __future__ import annotations

import pytest

from mbridge.shell.pretrain import check_vision
from mbridge.train import recipes
from mbridge.train.config import ConfigError, apply_overrides
from mbridge.train.image_text import check_image_tokens, image_text_sample, record_parts
from mbridge.train.sft import SFTDataError


def test_placeholders_and_prompt_are_not_scored():
    tokens, mask = image_text_sample([5, 9, 9, 7, 8], prompt_tokens=1, image_token_id=9)
    assert tokens == [5, 9, 9, 7, 8] and mask == [False, False, False, True, True]
    _, mask = image_text_sample([9, 9, 3, 9, 4], prompt_tokens=0, image_token_id=9)
    assert mask == [False, False, True, False, True]


def test_image_token_count_must_match_the_features():
    check_image_tokens([1, 9, 9, 9, 9, 2], images=2, tokens_per_image=2, image_token_id=9)
    with pytest.raises(SFTDataError, match="3 image tokens .* for 2 image.* \\(4 expected\\)"):
        check_image_tokens([1, 9, 9, 9, 2], images=2, tokens_per_image=2, image_token_id=9)


@pytest.mark.parametrize("record, message", [
    ({"text": "a cat"}, "needs 'images'"),
    ({"images": [], "text": "a cat"}, "needs 'images'"),
    ({"images": ["a.png"], "prompt": "q"}, "'prompt' and 'completion'"),
    ({"images": ["a.png"], "text": 3}, "'text' must be a string"),
])
def test_bad_records(record, message):
    with pytest.raises(SFTDataError, match=message):
        record_parts(record)


def test_record_parts():
    assert record_parts({"images": ["a.png"], "text": "<image> a"}) == (["a.png"], "", "<image> a")
    assert record_parts({"images": ["a.png"], "prompt": "<image> q", "completion": "a"}) == (
        ["a.png"], "<image> q", "a")


def test_freeze_keys_need_a_vision_model():
    from mbridge.train.recipes import TINY_LLAMA

    cfg = apply_overrides(recipes.tiny_llama_pretrain(), ["model.freeze_vision_model=true"])
    with pytest.raises(ConfigError, match="has no vision model"):
        check_vision(cfg, TINY_LLAMA, None)


def test_vision_runs_need_image_text_data_and_something_to_train(llava):
    from mbridge import AutoBridge

    spec = AutoBridge.from_hf_pretrained(llava[0]).spec
    cfg = recipes.tiny_llava_pretrain(hf_path=str(llava[0]), dataset_root=str(llava[1].parent))
    check_vision(cfg, spec, llava[0])
    frozen = apply_overrides(cfg, ["model.freeze_vision_projection=true"])
    with pytest.raises(ConfigError, match="nothing would train"):
        check_vision(frozen, spec, llava[0])
    mock = apply_overrides(cfg, ["data.dataset_root=null", "data.mock=true"])
    with pytest.raises(ConfigError, match="trains on image-text records"):
        check_vision(mock, spec, llava[0])
    with pytest.raises(ConfigError, match="holds no processor_config.json"):
        check_vision(cfg, spec, llava[1].parent)
