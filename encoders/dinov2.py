"""DINOv2 (ViT with CLS token): resize + center crop + ImageNet mean/std, fixed-size batches."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

from encoders._base import EmbedOptions, Prepared, TowerOutput
from encoders._pixels import PixelTable, model_pixels
from encoders._registry import register_encoder
from encoders._tower import TowerEncoder, prepared_from
from storage.images import DecodeConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@register_encoder("dinov2")
class Dinov2Encoder(TowerEncoder):
    """DINOv2 backbone: CLS vector (default pooling) and 14 px patch tokens at a fixed crop."""

    default_pooling = "cls"
    has_cls = True
    has_merger = False
    config_class = Dinov2Config
    model_class = Dinov2Model
    processor_class = BitImageProcessorPil
    model_types = ("dinov2",)
    vision_prefixes = ("dinov2.",)
    vlm_model_type = "dinov2"
    vlm_architecture = "Dinov2ForImageClassification"  # the "full model" layout: backbone + head
    vlm_prefix = "dinov2."

    @classmethod
    def tiny_config(cls) -> Dinov2Config:
        return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

    @classmethod
    def tiny_processor_kwargs(cls) -> dict[str, Any]:
        return cls.default_processor_kwargs()

    @classmethod
    def default_processor_kwargs(cls) -> dict[str, Any]:
        return {
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "resample": 3,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
        }

    @classmethod
    def processor_overrides(cls, crop_size: int | None = None) -> dict[str, Any]:
        """`crop_size=S` keeps DINOv2's 256/224 resize-to-crop ratio at another resolution."""
        if crop_size is None:
            return {}
        return {
            "size": {"shortest_edge": round(crop_size * 256 / 224)},
            "crop_size": {"height": crop_size, "width": crop_size},
        }

    @classmethod
    def vlm_config_dict(cls, vision_config: Any) -> dict[str, Any]:
        """A classification checkpoint's config is flat: the backbone's keys plus the head's labels."""
        return {**vision_config.to_dict(), "architectures": [cls.vlm_architecture]}

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def dim(self) -> int:
        return int(self.config.hidden_size)

    def decode_config(self) -> DecodeConfig:
        """JPEGs decode straight at the scale the shortest-edge resize needs (see DecodeConfig)."""
        p = self.processor
        return DecodeConfig(draft_short_side=p.size.get("shortest_edge") if p.do_resize else None)

    def processor_config(self) -> dict[str, Any]:
        draft = self.decode_config().draft_short_side
        return {**super().processor_config(), "decode_draft_short_side": draft}

    def preprocess_image(self, image: Any) -> Prepared:
        """uint8 after resize and crop; collate normalises on the device (see encoders._pixels)."""
        pixels = model_pixels(self.processor, image)["pixel_values"][0]
        _, h, w = pixels.shape
        return prepared_from(pixels, image, None, 1 + (h // self.patch_size) * (w // self.patch_size))

    def batch_key(self, prepared: Prepared) -> Any:
        return prepared.pixel_values.shape  # without the crop, only equal sizes stack

    def num_tokens(self, height: int, width: int, *, merged: bool = True) -> int:
        """Patch tokens (CLS excluded) for an image of this size after resize and crop."""
        p = self.processor
        if p.do_center_crop:
            h, w = p.crop_size["height"], p.crop_size["width"]
        else:
            short = p.size["shortest_edge"]
            scale = short / min(height, width)
            h, w = (short, int(width * scale)) if height <= width else (int(height * scale), short)
        return (h // self.patch_size) * (w // self.patch_size)

    @functools.cached_property
    def pixel_table(self) -> PixelTable:
        return PixelTable(self.processor)

    def collate(self, batch: list[Prepared]) -> torch.Tensor:
        arrays = [p.pixel_values for p in batch]
        channel = np.arange(arrays[0].shape[0]).reshape(-1, 1, 1)
        return self.pixel_table.join(arrays, np.stack, channel, self.device, self.dtype)

    def run_collated(self, inputs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return self.model(pixel_values=inputs)

    def forward(self, batch: list[Prepared], opts: EmbedOptions) -> list[TowerOutput]:
        with torch.inference_mode():
            states = self.run_collated(self.collate(batch)).last_hidden_state.float().cpu()
        _, h, w = batch[0].pixel_values.shape
        grid = (h // self.patch_size, w // self.patch_size)
        return [TowerOutput(tokens=s[1:], grid=grid, cls=s[0]) for s in states]
