"""Variable-resolution towers (Qwen2.5-VL, Qwen3-VL, GLM-4V): many images packed into one forward.

Each image keeps its own attention sequence (cu_seqlens inside the transformers model), so a packed
batch equals the per-image forwards; batches are bounded by a token budget, not an image count.
"""

from __future__ import annotations

import functools
import types
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from encoders._attention import default_packed_attention
from encoders._base import EmbedOptions, Prepared, TowerOutput
from encoders._pixels import PixelTable, model_pixels
from encoders._tower import TowerEncoder, prepared_from


class PackedInputs(NamedTuple):
    """One packed batch on the device, plus the grid-derived tensors transformers would compute itself.

    `seq_kwargs` (cu_seqlens, max_seqlen, position_ids, ...) are built on the host from the grid list,
    so the forward needs no device-to-host sync for them; transformers pops them from its kwargs.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    seq_kwargs: dict[str, Any]


def block_to_row_major(x: torch.Tensor, t: int, h: int, w: int, m: int) -> torch.Tensor:
    """Pre-merger states come in m x m block order (the processor's layout); users want row-major."""
    d = x.shape[-1]
    return x.reshape(t, h // m, w // m, m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(t * h * w, d)


def _linear_patch_embed_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.proj.weight.view(self.proj.out_channels, -1)  # a view: the weights stay where they were
    return F.linear(hidden_states.reshape(-1, weight.shape[1]).to(weight.dtype), weight, self.proj.bias)


def linear_patch_embed(patch_embed: torch.nn.Module) -> bool:
    """Run a patch embedding whose Conv3d kernel equals its stride as the one GEMM it is; same weights.

    Each token is one flattened (C, T, P, P) patch, so the convolution is a matmul with the flattened
    kernel, but oneDNN and cuDNN run it as a 3D convolution: 72 vs 19 ms for 2048 tokens of the small
    Qwen on one CPU core (6.5% of its forward). On an H100 the convolution took 4.5% of a compiled
    Qwen2.5-VL-7B forward (profile; the linear form is not yet measured there).
    Returns whether it applied (a conv with padding, dilation or groups is left alone).
    """
    proj = getattr(patch_embed, "proj", None)
    one_gemm = (
        isinstance(proj, torch.nn.Conv3d) and tuple(proj.kernel_size) == tuple(proj.stride)
        and proj.padding in ((0, 0, 0), "valid") and proj.dilation == (1, 1, 1) and proj.groups == 1
    )  # fmt: skip
    if not one_gemm:
        return False
    patch_embed.forward = types.MethodType(_linear_patch_embed_forward, patch_embed)
    return True


class PackedTowerEncoder(TowerEncoder):
    """Shared forward for towers taking (pixel_values (seq, C*T*P*P), grid_thw) and merging m x m tokens."""

    def __init__(self, model: torch.nn.Module | None, processor: Any, **kwargs: Any):
        super().__init__(model, processor, **kwargs)
        if self.model is not None:
            linear_patch_embed(self.model.patch_embed)

    @classmethod
    def processor_overrides(
        cls, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> dict[str, Any]:
        """Pixels per image, bounds of the smart resize (the Qwen processors take them as they are)."""
        out = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def default_attn_implementation(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """Packed varlen attention where its kernel runs (CUDA, fp16/bf16); transformers' sdpa elsewhere."""
        return default_packed_attention(device, dtype)

    @property
    def merge(self) -> int:
        return int(self.config.spatial_merge_size)

    @property
    def dim(self) -> int:
        return int(self.config.out_hidden_size)

    def compile_blocks(self, **options: Any) -> None:
        """Opt-in torch.compile of every vision block (lazy: compiles on the first forward).

        Fuses the eager fp32 RMSNorm / rotary / activation kernels that dominate a varlen forward:
        measured on an H100, Qwen2.5-VL-7B tower at 448x448, 167 -> 340 img/s after a ~6 s warm-up.
        dynamic=True because every packed batch has a different token count.
        """
        if self.model is None:
            raise RuntimeError(f"{self.name}: a preprocessing-only instance has no model to compile")
        for block in self.model.blocks:
            block.compile(**{"dynamic": True, **options})

    @functools.cached_property
    def pixel_table(self) -> PixelTable:
        return PixelTable(self.processor)

    def preprocess_image(self, image: Any) -> Prepared:
        """uint8 patches (seq, C*T*P*P); collate normalises them on the device (see encoders._pixels)."""
        out = model_pixels(self.processor, image)
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        return prepared_from(out["pixel_values"], image, (t, h, w), t * h * w)

    def num_tokens(self, height: int, width: int, *, merged: bool = True) -> int:
        n = int(self.processor.get_number_of_image_patches(height, width))
        return n // self.merge**2 if merged else n

    def pre_merger_states(self, out: Any, grid_thw: torch.Tensor) -> torch.Tensor:
        """(seq, hidden) states before the merger, in the processor's block order."""
        return out.last_hidden_state

    def run_tower(self, inputs: PackedInputs, opts: EmbedOptions) -> Any:
        return self.call_model(inputs)

    def call_model(self, inputs: PackedInputs) -> Any:
        return self.model(inputs.pixel_values, grid_thw=inputs.grid_thw, **inputs.seq_kwargs)

    def seq_kwargs(self, grid_thw: torch.Tensor) -> dict[str, Any]:
        """Grid-derived forward inputs from a host grid, with transformers' own functions (same values)."""
        cu_seqlens = get_vision_cu_seqlens(grid_thw)
        return {
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int(cu_seqlens.diff().max()),
            "position_ids": get_vision_position_ids(grid_thw, self.merge),
        }

    def collate(self, batch: list[Prepared]) -> PackedInputs:
        """One packed input on the device: pixel_values (seq, C*T*P*P), grid_thw (n, 3), seq_kwargs."""
        arrays = [p.pixel_values for p in batch]
        cols = arrays[0].shape[1]  # channel-major: C blocks of T*P*P values
        channel = (np.arange(cols) // (cols // self.pixel_table.channels)).reshape(1, -1)
        pixels = self.pixel_table.join(arrays, np.concatenate, channel, self.device, self.dtype)
        grid_thw = torch.tensor([p.grid_thw for p in batch], dtype=torch.long)
        seq_kwargs = {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in self.seq_kwargs(grid_thw).items()
        }
        return PackedInputs(pixels, grid_thw.to(self.device, non_blocking=True), seq_kwargs)

    def run_collated(self, inputs: PackedInputs) -> Any:
        """The bare tower forward (what a benchmark's ceiling measures)."""
        with torch.inference_mode():
            return self.call_model(inputs)

    def forward(self, batch: list[Prepared], opts: EmbedOptions) -> list[TowerOutput]:
        thw_list = [p.grid_thw for p in batch]
        inputs = self.collate(batch)
        grid_thw = inputs.grid_thw
        m = self.merge
        with torch.inference_mode():
            out = self.run_tower(inputs, opts)
            merged_counts = [t * h * w // (m * m) for t, h, w in thw_list]
            if opts.patch_level == "merged":
                tokens = torch.split(out.pooler_output.float().cpu(), merged_counts)
                grids = [(h // m, w // m) for _, h, w in thw_list]
            else:
                states = self.pre_merger_states(out, grid_thw).float().cpu()
                parts = torch.split(states, [t * h * w for t, h, w in thw_list])
                tokens = [block_to_row_major(x, *thw, m) for x, thw in zip(parts, thw_list, strict=True)]
                grids = [(h, w) for _, h, w in thw_list]
            extras = self.extras(out, merged_counts, opts)
        return [
            TowerOutput(tokens=tok, grid=grid, extras={k: v[i] for k, v in extras.items()})
            for i, (tok, grid) in enumerate(zip(tokens, grids, strict=True))
        ]

    def extras(self, out: Any, merged_counts: list[int], opts: EmbedOptions) -> dict[str, list[torch.Tensor]]:
        return {}
