"""GLM-4V vision tower (GLM-4.1V / GLM-4.5V family): conv 2x2 downsample, then the merger MLP."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Glm4vImageProcessorPil, Glm4vVisionConfig, Glm4vVisionModel

from encoders._base import EmbedOptions
from encoders._packed import PackedInputs, PackedTowerEncoder
from encoders._qwen_norms import CLIP_MEAN, CLIP_STD
from encoders._registry import register_encoder


@register_encoder("glm4v")
class Glm4vEncoder(PackedTowerEncoder):
    """GLM-4V tower: merged tokens after the 2x2 conv downsample and merger MLP; mean pooled."""

    config_class = Glm4vVisionConfig
    model_class = Glm4vVisionModel
    processor_class = Glm4vImageProcessorPil
    model_types = ("glm4v", "glm4v_vision")
    vision_prefixes = ("model.visual.", "visual.")
    vlm_model_type = "glm4v"
    vlm_architecture = "Glm4vForConditionalGeneration"
    vlm_prefix = "model.visual."

    @classmethod
    def tiny_config(cls) -> Glm4vVisionConfig:
        return Glm4vVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=48,
            image_size=112,
        )

    @classmethod
    def tiny_processor_kwargs(cls) -> dict[str, Any]:
        return {
            **cls.processor_overrides(min_pixels=56 * 56, max_pixels=224 * 224),
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        }

    @classmethod
    def default_processor_kwargs(cls) -> dict[str, Any]:
        return {
            "size": {"shortest_edge": 12544, "longest_edge": 9633792},
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        }

    @classmethod
    def processor_overrides(
        cls, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> dict[str, Any]:
        """GLM bounds pixels over (frames x h x w) with 2 frames per image; users mean pixels per image."""
        if min_pixels is None and max_pixels is None:
            return {}
        size = cls.default_processor_kwargs()["size"].copy()
        if min_pixels is not None:
            size["shortest_edge"] = 2 * min_pixels
        if max_pixels is not None:
            size["longest_edge"] = 2 * max_pixels
        return {"size": size}

    def run_tower(self, inputs: PackedInputs, opts: EmbedOptions) -> Any:
        """Pre-merger states are post_layernorm's output (last_hidden_state is already downsampled)."""
        if opts.patch_level != "pre_merger":
            return self.call_model(inputs)
        captured: list[torch.Tensor] = []
        handle = self.model.post_layernorm.register_forward_hook(lambda _m, _i, o: captured.append(o))
        try:
            out = self.call_model(inputs)
        finally:
            handle.remove()
        out.pre_merger = captured[0]
        return out

    def pre_merger_states(self, out: Any, grid_thw: torch.Tensor) -> torch.Tensor:
        return out.pre_merger
