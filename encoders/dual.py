"""Qwen2.5-VL + DINOv2 on the same decoded image, fused by a gating network into one vector.

Semantics from Qwen (language-aligned) and geometry from DINOv2 (self-supervised); the gate decides
per image how much of each. Without trained fusion weights the fused vector is the concatenation of
the two L2-normalised pooled vectors (equal weights, reported as 0.5/0.5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from encoders._base import EmbedOptions, Encoder, Prepared, TowerOutput, config_hash, plan_batches, pool
from encoders._registry import register_encoder
from encoders._tower import TOWERFLOW_FILE
from encoders._weights import open_checkpoint, tensors_revision
from encoders.dinov2 import Dinov2Encoder
from encoders.qwen2_5_vl import Qwen25VLEncoder

FUSION_FILE = "fusion.safetensors"
PARTS = ("qwen2_5_vl", "dinov2")


class GatedFusion(torch.nn.Module):
    """Project both pooled vectors to `dim`, gate them with per-image softmax weights, sum."""

    def __init__(self, dim_a: int, dim_b: int, dim: int):
        super().__init__()
        self.proj_a = torch.nn.Linear(dim_a, dim)
        self.proj_b = torch.nn.Linear(dim_b, dim)
        self.gate = torch.nn.Sequential(
            torch.nn.Linear(2 * dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, 2)
        )
        self.dim = dim

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GatedFusion:
        dim, dim_a = state["proj_a.weight"].shape
        module = cls(dim_a, state["proj_b.weight"].shape[1], dim)
        module.load_state_dict(state)
        return module.eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pa, pb = self.proj_a(a), self.proj_b(b)
        weights = torch.softmax(self.gate(torch.cat([pa, pb], dim=-1)), dim=-1)
        return weights[:, :1] * pa + weights[:, 1:] * pb, weights


def _forward_grouped(enc: Encoder, prepared: list[Prepared], opts: EmbedOptions) -> list[TowerOutput]:
    """One forward per stackable group (DINOv2 without crop cannot stack mixed sizes)."""
    outs: list[TowerOutput | None] = [None] * len(prepared)
    for idx in plan_batches([1] * len(prepared), len(prepared) or 1, [enc.batch_key(p) for p in prepared]):
        for i, o in zip(idx, enc.forward([prepared[i] for i in idx], opts), strict=True):
            outs[i] = o
    return outs  # type: ignore[return-value]


@register_encoder("dual")
class DualEncoder(Encoder):
    """Qwen2.5-VL + DINOv2 fused by a gate; pooling (mean/max) applies to the Qwen side, DINOv2 gives CLS."""

    default_pooling = "mean"
    has_merger = False  # the fused vector is defined on Qwen's merged tokens only

    def __init__(
        self, qwen: Qwen25VLEncoder, dino: Dinov2Encoder, fusion: GatedFusion | None, fusion_rev: str
    ):
        self.qwen, self.dino, self.fusion = qwen, dino, fusion
        self.device, self.dtype = qwen.device, qwen.dtype
        self.revision = config_hash([qwen.revision, dino.revision, fusion_rev])
        self.preprocess_hash = config_hash([qwen.preprocess_hash, dino.preprocess_hash])

    @classmethod
    def load(cls, weights: Any, *, storage_options: dict | None = None, **kwargs: Any) -> DualEncoder:
        """WEIGHTS: a directory holding qwen2_5_vl/, dinov2/ and optionally fusion.safetensors, or a dict."""
        paths = cls._paths(weights)
        shared = {
            k: kwargs.pop(k)
            for k in ("device", "dtype", "attn_implementation", "allow_pickle")
            if k in kwargs
        }
        dino_kwargs = {k: kwargs.pop(k) for k in ("crop_size",) if k in kwargs}
        qwen = Qwen25VLEncoder.load(paths["qwen2_5_vl"], storage_options=storage_options, **shared, **kwargs)
        dino = Dinov2Encoder.load(paths["dinov2"], storage_options=storage_options, **shared, **dino_kwargs)
        fusion, fusion_rev = cls._load_fusion(weights, storage_options)
        return cls(qwen, dino, fusion, fusion_rev)

    @classmethod
    def load_preprocessor(
        cls, weights: Any, *, storage_options: dict | None = None, revision: bool = False, **kwargs: Any
    ) -> DualEncoder:
        paths = cls._paths(weights)
        dino_kwargs = {k: kwargs.pop(k) for k in ("crop_size",) if k in kwargs}
        if "allow_pickle" in kwargs:
            dino_kwargs["allow_pickle"] = kwargs["allow_pickle"]
        qwen = Qwen25VLEncoder.load_preprocessor(
            paths["qwen2_5_vl"], storage_options=storage_options, revision=revision, **kwargs
        )
        dino = Dinov2Encoder.load_preprocessor(
            paths["dinov2"], storage_options=storage_options, revision=revision, **dino_kwargs
        )
        return cls(qwen, dino, *cls._load_fusion(weights, storage_options))

    @staticmethod
    def _paths(weights: Any) -> dict[str, Any]:
        if isinstance(weights, dict):
            return dict(weights)
        return {p: f"{os.fspath(weights).rstrip('/')}/{p}" for p in PARTS}

    @staticmethod
    def _load_fusion(weights: Any, storage_options: dict | None) -> tuple[GatedFusion | None, str]:
        if isinstance(weights, dict):
            fusion_path = weights.get("fusion")
            fusion_file = os.fspath(fusion_path) if fusion_path else None
        else:
            ckpt = open_checkpoint(weights, storage_options)
            fusion_file = ckpt.local_file(FUSION_FILE) if ckpt.exists(FUSION_FILE) else None
        if not fusion_file:
            return None, "concat"
        state = load_file(fusion_file)
        return GatedFusion.from_state_dict(state), tensors_revision(state)

    def save(self, directory: str | os.PathLike) -> None:
        root = Path(directory)
        self.qwen.save(root / "qwen2_5_vl")
        self.dino.save(root / "dinov2")
        if self.fusion is not None:
            save_file(
                {k: v.contiguous() for k, v in self.fusion.state_dict().items()}, str(root / FUSION_FILE)
            )
        (root / TOWERFLOW_FILE).write_text(
            json.dumps({"encoder": "dual", "fused": self.fusion is not None}) + "\n"
        )

    @classmethod
    def write_tiny_checkpoint(
        cls, directory: str | os.PathLike, layout: str = "vision", seed: int = 0, fusion_dim: int | None = 40
    ) -> None:
        root = Path(directory)
        Qwen25VLEncoder.write_tiny_checkpoint(root / "qwen2_5_vl", layout, seed)
        Dinov2Encoder.write_tiny_checkpoint(root / "dinov2", layout, seed + 7)
        if fusion_dim:
            torch.manual_seed(seed + 13)
            dims = (Qwen25VLEncoder.tiny_config().out_hidden_size, Dinov2Encoder.tiny_config().hidden_size)
            module = GatedFusion(*dims, fusion_dim)
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(root / FUSION_FILE))
        (root / TOWERFLOW_FILE).write_text(json.dumps({"encoder": "dual", "fused": bool(fusion_dim)}) + "\n")

    def processor_config(self) -> dict[str, Any]:
        return {"qwen2_5_vl": self.qwen.processor_config(), "dinov2": self.dino.processor_config()}

    @property
    def patch_dim(self) -> int:
        return self.qwen.dim

    @property
    def can_embed(self) -> bool:
        return self.qwen.can_embed and self.dino.can_embed

    @property
    def dim(self) -> int:
        return self.fusion.dim if self.fusion is not None else self.qwen.dim + self.dino.dim

    def num_tokens(self, height: int, width: int, *, merged: bool = True) -> int:
        return self.qwen.num_tokens(height, width, merged=merged)

    def preprocess_image(self, image: Any) -> Prepared:
        q, d = self.qwen.preprocess_image(image), self.dino.preprocess_image(image)
        return Prepared(
            q.pixel_values[:0], None, q.width, q.height, q.seq_len + d.seq_len, {"qwen2_5_vl": q, "dinov2": d}
        )

    def fuse(self, q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fusion is None:
            fused = torch.cat([F.normalize(q, dim=-1), F.normalize(d, dim=-1)], dim=-1)
            return fused, torch.full((len(q), 2), 0.5)
        with torch.inference_mode():
            return self.fusion(q, d)

    def collate(self, batch: list[Prepared]) -> tuple[Any, Any]:
        """Both towers' inputs (DINOv2's stack: with its centre crop every image has one shape)."""
        return (
            self.qwen.collate([p.parts["qwen2_5_vl"] for p in batch]),
            self.dino.collate([p.parts["dinov2"] for p in batch]),
        )

    def run_collated(self, inputs: tuple[Any, Any]) -> tuple[Any, Any]:
        return self.qwen.run_collated(inputs[0]), self.dino.run_collated(inputs[1])

    def forward(self, batch: list[Prepared], opts: EmbedOptions) -> list[TowerOutput]:
        q_opts = EmbedOptions(opts.pooling if opts.pooling in ("mean", "max") else "mean")
        q_out = self.qwen.forward([p.parts["qwen2_5_vl"] for p in batch], q_opts)
        d_out = _forward_grouped(self.dino, [p.parts["dinov2"] for p in batch], EmbedOptions("cls"))
        fused, weights = self.fuse(
            torch.stack([pool(o, q_opts.pooling) for o in q_out]), torch.stack([o.cls for o in d_out])
        )
        return [
            TowerOutput(
                tokens=q.tokens,
                grid=q.grid,
                pooled=fused[i],
                fusion=weights[i],
                extras={"dinov2_patches": d.tokens, "dinov2_grid": d.grid},
            )
            for i, (q, d) in enumerate(zip(q_out, d_out, strict=True))
        ]
