"""Qwen3-VL vision tower (16 px patches, learned position grid, deepstack mergers)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2VLImageProcessorPil, Qwen3VLVisionConfig, Qwen3VLVisionModel

from encoders._base import EmbedOptions
from encoders._packed import PackedTowerEncoder
from encoders._registry import register_encoder


@register_encoder("qwen3_vl")
class Qwen3VLEncoder(PackedTowerEncoder):
    """Qwen3-VL tower: merged tokens, optional deepstack features; mean pooled."""

    has_deepstack = True
    config_class = Qwen3VLVisionConfig
    model_class = Qwen3VLVisionModel
    processor_class = Qwen2VLImageProcessorPil
    model_types = ("qwen3_vl", "qwen3_vl_vision")
    vision_prefixes = ("model.visual.", "visual.")
    vlm_model_type = "qwen3_vl"
    vlm_architecture = "Qwen3VLForConditionalGeneration"
    vlm_prefix = "model.visual."

    @classmethod
    def tiny_config(cls) -> Qwen3VLVisionConfig:
        return Qwen3VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=48,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )

    @classmethod
    def tiny_processor_kwargs(cls) -> dict[str, Any]:
        return {
            "patch_size": 16,
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
            "min_pixels": 64 * 64,
            "max_pixels": 256 * 256,
        }

    @classmethod
    def default_processor_kwargs(cls) -> dict[str, Any]:
        return {
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
            "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        }

    def extras(self, out: Any, merged_counts: list[int], opts: EmbedOptions) -> dict[str, list[torch.Tensor]]:
        """Deepstack features per image as (layers, tokens, D), merged like the LLM-facing tokens."""
        if not opts.deepstack:
            return {}
        layers = [torch.split(f.float().cpu(), merged_counts) for f in out.deepstack_features]
        return {"deepstack": [torch.stack(per_image) for per_image in zip(*layers, strict=True)]}
