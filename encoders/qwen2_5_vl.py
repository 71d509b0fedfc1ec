"""Qwen2.5-VL vision tower (windowed attention, 2x2 merger), e.g. from Qwen/Qwen2.5-VL-7B-Instruct."""

from __future__ import annotations

import types
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
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
    # 3420, the released MLP width, is not a multiple of 8: cuBLAS falls back to slow 2-element-aligned
    # SM80 GEMMs (measured on an H100: the MLP took 43% of a 64k-token forward). 0 turns padding off.
    mlp_pad_multiple: ClassVar[int] = 64

    def __init__(self, model: torch.nn.Module | None, processor: Any, **kwargs: Any):
        super().__init__(model, processor, **kwargs)
        if self.model is not None and self.device.type == "cuda" and self.mlp_pad_multiple:
            for block in self.model.blocks:
                pad_mlp(block.mlp, self.mlp_pad_multiple)

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

    def _windows(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(window_index, cu_window_seqlens) of the packed batch, as transformers computes them."""
        cfg = self.config
        return get_vision_window_index(
            grid_thw,
            spatial_merge_size=cfg.spatial_merge_size,
            window_size=cfg.window_size,
            patch_size=cfg.patch_size,
        )

    def seq_kwargs(self, grid_thw: torch.Tensor) -> dict[str, Any]:
        """Adds the window partition (window_index, cu_window_seqlens), also built on the host."""
        window_index, cu_window_seqlens = self._windows(grid_thw)
        return {
            **super().seq_kwargs(grid_thw),
            "window_index": window_index,
            "cu_window_seqlens": cu_window_seqlens,
            "max_window_seqlen": int(cu_window_seqlens.diff().max()),
        }

    def pre_merger_states(self, out: Any, grid_thw: torch.Tensor) -> torch.Tensor:
        """last_hidden_state comes back in window order; undo it per merge unit."""
        cfg = self.config
        window_index, _ = self._windows(grid_thw)
        unit = cfg.spatial_merge_size**2
        states = out.last_hidden_state
        reverse = torch.argsort(window_index.to(states.device))
        return states.reshape(-1, unit, states.shape[-1])[reverse].reshape(states.shape)


def _padded_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, self.padded_gate_up_weight, self.padded_gate_up_bias).chunk(2, dim=-1)
    return F.linear(self.act_fn(gate) * up, self.padded_down_weight, self.down_proj.bias)


def pad_mlp(mlp: torch.nn.Module, multiple: int) -> bool:
    """Compute a gated MLP with its width zero-padded to MULTIPLE (gate and up in one GEMM); same outputs.

    Padded units have zero weights and bias, so act(0) * 0 = 0 and they add nothing to down_proj.
    The module's own parameters become views of the padded storage: state_dict and save keep the
    released shapes, and no weight is held twice. Returns whether anything was padded.
    """
    n, m = mlp.gate_proj.out_features, -(-mlp.gate_proj.out_features // multiple) * multiple
    if m == n or mlp.gate_proj.bias is None or mlp.up_proj.bias is None:
        return False
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    with torch.no_grad():
        gate_up_w = gate.weight.new_zeros(2 * m, gate.in_features)
        gate_up_b = gate.bias.new_zeros(2 * m)
        down_w = down.weight.new_zeros(down.out_features, m)
        for lin, at in ((gate, 0), (up, m)):
            gate_up_w[at : at + n] = lin.weight
            gate_up_b[at : at + n] = lin.bias
        down_w[:, :n] = down.weight
    gate.weight = torch.nn.Parameter(gate_up_w[:n], requires_grad=False)
    up.weight = torch.nn.Parameter(gate_up_w[m : m + n], requires_grad=False)
    gate.bias = torch.nn.Parameter(gate_up_b[:n], requires_grad=False)
    up.bias = torch.nn.Parameter(gate_up_b[m : m + n], requires_grad=False)
    down.weight = torch.nn.Parameter(down_w[:, :n], requires_grad=False)
    mlp.register_buffer("padded_gate_up_weight", gate_up_w, persistent=False)
    mlp.register_buffer("padded_gate_up_bias", gate_up_b, persistent=False)
    mlp.register_buffer("padded_down_weight", down_w, persistent=False)
    mlp.forward = types.MethodType(_padded_mlp_forward, mlp)
    return True
