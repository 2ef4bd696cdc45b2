"""Vision-language models on Megatron-Core, in Megatron-Core's MIMO structure
(``megatron/core/models/mimo``): ``modality_submodules["images"]`` (a
``VisionModalitySubmodules``: one encoder, named for its tower, and LLaVA's input
projection) beside the ``language_model`` (a ``GPTModel``), the image placeholder tokens of
``input_ids`` replaced by the projected features
(``MimoModel.align_embeddings_by_token_positions``).

The vision towers and projector are Hugging Face's own modules, built from the checkpoint's
``vision_config``: LLaVA's ``CLIPVisionModel`` and ``LlavaMultiModalProjector``,
Qwen2.5-VL's ``Qwen2_5_VisionTransformerPretrainedModel`` (window attention and the patch
merger, which is its projection). They are replicated over tensor-parallel ranks: every
rank computes the same features, the gradient that reaches them is already summed over the
tensor-parallel group (the first layer's column-parallel input), so they need no collective
of their own and compute exactly what HF computes.
``VisionLanguageModel`` adds to ``MimoModel`` what a pipeline stage needs: the modality
submodules live on the first stage only, later stages run the language model on the
activations they receive, and the language model's output (logits or loss) is returned as
``GPTModel`` returns it, so Megatron-Core's schedules and mbridge's forward take it as one.
A language model with multimodal rope (Qwen2.5-VL) rotates by 3-D positions that every
stage computes from ``input_ids`` and ``image_grid_thw`` (``rope.mrope_position_ids``).
"""

from __future__ import annotations

import functools
import json
import warnings
from types import SimpleNamespace

import torch

from mbridge.rope import mrope_position_ids
from mbridge.specs import VisionSpec


@functools.cache
def _qwen_submodules_class():
    from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules

    class QwenVisionSubmodules(VisionModalitySubmodules):
        """The tower's merged features ``[tokens, out_hidden]`` of every image, in order
        (``Qwen2_5_VLModel.get_image_features``); the merger inside the tower projects them."""

        def encode(self, encoders_data_batch):
            inputs = encoders_data_batch["qwen2_5_vl"]
            tower = self.encoders["qwen2_5_vl"]
            pixels = inputs["pixel_values"].to(next(tower.parameters()).dtype)
            return [tower(pixels, grid_thw=inputs["image_grid_thw"]).pooler_output]

    return QwenVisionSubmodules


@functools.cache
def _submodules_class():
    from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules

    class LlavaVisionSubmodules(VisionModalitySubmodules):
        """The tower's hidden states of ``vision.feature_layers`` (CLS dropped for the
        ``default`` strategy), concatenated, as ``LlavaModel.get_image_features`` selects
        them, flattened to ``[images * tokens_per_image, layers * hidden]`` for the
        projection."""

        def __init__(self, *, vision: VisionSpec, **kwargs):
            super().__init__(**kwargs)
            self.feature_layers = vision.feature_layers
            self.drop_cls = vision.select_strategy == "default"

        def encode(self, encoders_data_batch):
            pixels = encoders_data_batch["clip"]["pixel_values"]
            tower = self.encoders["clip"]
            pixels = pixels.to(next(tower.parameters()).dtype)
            out = tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
            feats = [out.hidden_states[i] for i in self.feature_layers]
            if self.drop_cls:
                feats = [f[:, 1:] for f in feats]
            feats = torch.cat(feats, dim=-1)
            return [feats.reshape(-1, feats.shape[-1])]

    return LlavaVisionSubmodules


def modality_spec(vision: VisionSpec, text_hidden: int):
    """The ``images`` modality as Megatron-Core's ``ModuleSpec``: HF's tower from the
    checkpoint's ``vision_config`` (and LLaVA's projector)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if vision.tower == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
            Qwen2_5_VLVisionConfig,
        )
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        tower_cfg = Qwen2_5_VLVisionConfig(**json.loads(vision.tower_config))
        return ModuleSpec(module=_qwen_submodules_class(), submodules={"encoders": {
            "qwen2_5_vl": ModuleSpec(module=Qwen2_5_VisionTransformerPretrainedModel,
                                     params={"config": tower_cfg})}})
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tower_cfg = CLIPVisionConfig(**json.loads(vision.tower_config))
    # the projector reads only these fields of a LlavaConfig
    layers = vision.feature_layers
    projector_cfg = SimpleNamespace(
        vision_feature_layer=layers[0] if len(layers) == 1 else list(layers),
        vision_config=SimpleNamespace(hidden_size=vision.hidden_size),
        text_config=SimpleNamespace(hidden_size=text_hidden),
        multimodal_projector_bias=vision.projector_bias,
        projector_hidden_act=vision.projector_act)
    return ModuleSpec(module=_submodules_class(), params={"vision": vision}, submodules={
        "encoders": {"clip": ModuleSpec(module=CLIPVisionModel, params={"config": tower_cfg})},
        "input_projections": [ModuleSpec(module=LlavaMultiModalProjector,
                                         params={"config": projector_cfg})]})


def _replicated_over_tp(sharded: dict, prefix: str, tp_group) -> dict:
    """The modality submodules' tensors as replicas over the tensor-parallel group: TP rank
    ``r`` holds replica ``(0, r, dp)``. Megatron-Core 0.19's MimoModel builds them without a
    TP group (``sharded_state_dict_default(..., tp_group=None)``), so every TP rank claimed
    to be the main replica and ``dist_checkpointing.load`` refused the layout at TP=2
    ("Invalid access pattern"); 0.16 numbers them already, and is left as it is."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rank = tp_group.rank() if tp_group is not None else 0
    for key, value in sharded.items():
        if (key.startswith(prefix) and isinstance(value, ShardedTensor)
                and isinstance(value.replica_id, tuple) and len(value.replica_id) == 3):
            value.replica_id = (value.replica_id[0], rank, value.replica_id[2])
    return sharded


@functools.cache
def _model_class():
    from megatron.core.models.mimo import MimoModel

    class VisionLanguageModel(MimoModel):
        """``MimoModel`` as one pipeline stage (see the module docstring)."""

        def __init__(self, config, vision: VisionSpec):
            super().__init__(config)
            self.vision = vision

        @property
        def pg_collection(self):
            return self.language_model.pg_collection

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            return _replicated_over_tp(sharded, f"{prefix}modality_submodules.",
                                       self.pg_collection.tp)

        @property
        def model_type(self):
            return self.language_model.model_type

        @property
        def pre_process(self):
            return self.language_model.pre_process

        @property
        def post_process(self):
            return self.language_model.post_process

        @property
        def share_embeddings_and_output_weights(self):
            return self.language_model.share_embeddings_and_output_weights

        def shared_embedding_or_output_weight(self):
            return self.language_model.shared_embedding_or_output_weight()

        def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None,
                    pixel_values=None, image_grid_thw=None, loss_mask=None,
                    packed_seq_params=None, image_embeddings=None, **kwargs):
            lm = self.language_model
            extra = {} if packed_seq_params is None else {"packed_seq_params": packed_seq_params}
            rope = self.rope_positions(input_ids, position_ids, image_grid_thw)
            if not lm.pre_process:
                return lm(None, rope, attention_mask, labels=labels, **extra)
            token = self.special_token_ids["images"]
            embeddings = {}
            if image_embeddings is not None:  # made by the encoder's ranks (MIMO layouts)
                embeddings["images"] = image_embeddings
            elif pixel_values is not None:
                embeddings["images"] = self.modality_submodules["images"](
                    encoder_inputs=self.encoder_inputs(pixel_values, image_grid_thw))
            elif bool((input_ids == token).any()):
                raise ValueError(f"input_ids hold image tokens ({token}) but no pixel_values "
                                 "were given")
            text_positions = position_ids if position_ids is None or position_ids.dim() == 2 \
                else None
            embeddings["text"] = self.get_text_embeddings(input_ids, text_positions,
                                                          self.special_token_ids)
            combined = self.align_embeddings_by_token_positions(embeddings, input_ids,
                                                                self.special_token_ids)
            return lm(None, rope, attention_mask, decoder_input=combined, labels=labels,
                      **extra)

        def encoder_inputs(self, pixel_values, image_grid_thw):
            if self.vision.tower == "clip":
                return {"clip": {"pixel_values": pixel_values}}
            if image_grid_thw is None:
                raise ValueError("a Qwen2.5-VL model needs image_grid_thw with its "
                                 "pixel_values (what its image processor returns)")
            return {"qwen2_5_vl": {"pixel_values": pixel_values,
                                   "image_grid_thw": image_grid_thw}}

        def rope_positions(self, input_ids, position_ids, image_grid_thw):
            """The positions the language model rotates by: 3-D ones for multimodal rope
            (given, or computed from ``input_ids`` and ``image_grid_thw``)."""
            if self.language_model.position_embedding_type != "mrope":
                return position_ids
            if position_ids is not None and position_ids.dim() == 3:
                return position_ids
            return mrope_position_ids(input_ids, image_grid_thw,
                                      image_token_id=self.vision.image_token_id,
                                      spatial_merge_size=self.vision.spatial_merge_size)

    return VisionLanguageModel


def build(vision: VisionSpec, text_hidden: int, gpt_params: dict, first: bool):
    """One chunk: the language model ``GPTModel(**gpt_params)``, and with ``first`` (the
    first chunk of the first stage, unless the encoder lives on other ranks: MIMO layouts)
    the ``images`` modality; without it the chunk takes ``image_embeddings``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.mimo import MimoModelConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

    with warnings.catch_warnings():  # MIMO warns that it is experimental on every build
        warnings.simplefilter("ignore", UserWarning)
        config = MimoModelConfig(
            language_model_spec=ModuleSpec(module=GPTModel, params=gpt_params),
            modality_submodules_spec={"images": modality_spec(vision, text_hidden)}
            if first else {},
            special_token_ids={"images": vision.image_token_id})
        return _model_class()(config, vision)


class VisionPart(torch.nn.Module):
    """The ``images`` modality alone (an encoder module of a MIMO layout: its own ranks or
    its own TP/DP), under the names it has inside ``VisionLanguageModel``
    (``modality_submodules.images.*``), so checkpoints and mappings address it unchanged.
    ``forward(pixel_values)`` -> the projected features ``[images * tokens, text_hidden]``."""

    def __init__(self, vision: VisionSpec, text_hidden: int):
        super().__init__()
        spec = modality_spec(vision, text_hidden)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.modality_submodules = torch.nn.ModuleDict(
                {"images": spec.module.from_spec(spec)})

    def forward(self, pixel_values):
        return self.modality_submodules["images"](
            encoder_inputs={"clip": {"pixel_values": pixel_values}})


def language_model(chunk):
    """The ``GPTModel`` of a chunk (the chunk itself for a text model)."""
    return getattr(chunk, "language_model", chunk)
