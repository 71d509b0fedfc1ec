"""Qwen2.5-VL vision tower (windowed attention, 2x2 merger), e.g. from Qwen/Qwen2.5-VL-7B-Instruct."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from encoders._packed import PackedTowerEncoder
from encoders._qwen_norms import CLIP_MEAN, CLIP_STD
from encoders._registry import register_encoder


@register_encoder("qwen2_5_vl")
class Qwen25VLEncoder(PackedTowerEncoder):
    """Qwen2.5-VL tower: LLM-facing tokens after the 2x2 merger, any resolution; mean pooled."""

    config_class = Qwen2_5_VLVisionConfig
    model_class = Qwen2_5_VisionTransformerPretrainedModel
    processor_class = Qwen2VLImageProcessorPil
    model_types = ("qwen2_5_vl", "qwen2_5_vl_vision")
    vision_prefixes = ("model.visual.", "visual.")
    vlm_model_type = "qwen2_5_vl"
    vlm_architecture = "Qwen2_5_VLForConditionalGeneration"
    vlm_prefix = "visual."  # released checkpoints; transformers' current classes save model.visual.

    @classmethod
    def tiny_config(cls) -> Qwen2_5_VLVisionConfig:
        return Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=48,
            window_size=56,
            fullatt_block_indexes=[1],
        )

    @classmethod
    def tiny_processor_kwargs(cls) -> dict[str, Any]:
        return {
            "min_pixels": 56 * 56,
            "max_pixels": 224 * 224,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        }

    @classmethod
    def default_processor_kwargs(cls) -> dict[str, Any]:
        return {
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        }

    def pre_merger_states(self, out: Any, grid_thw: torch.Tensor) -> torch.Tensor:
        """last_hidden_state comes back in window order; undo it per merge unit."""
        cfg = self.config
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=cfg.spatial_merge_size,
            window_size=cfg.window_size,
            patch_size=cfg.patch_size,
        )
        unit = cfg.spatial_merge_size**2
        states = out.last_hidden_state
        reverse = torch.argsort(window_index.to(states.device))
        return states.reshape(-1, unit, states.shape[-1])[reverse].reshape(states.shape)
