"""The fp16 CUDA path (default dtype on GPU) against fp32, for every encoder; skipped without CUDA."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from _support import ENCODERS, smooth_image

import encoders

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP16_REL_TOL = 2e-2


@pytest.fixture(autouse=True)
def _exact_fp32():
    """The fp32 reference must be fp32: cuDNN convolutions default to TF32 on Ampere and later."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


@pytest.mark.parametrize("name", ENCODERS)
def test_fp16_cuda_matches_fp32(name, checkpoint, images):
    fp32 = encoders.load(name, weights=checkpoint(name), device="cuda", dtype="fp32").embed(images)
    enc = encoders.load(name, weights=checkpoint(name), device="cuda")
    assert enc.dtype == torch.float16 and enc.device.type == "cuda"
    fp16 = enc.embed(images)
    cpu = encoders.load(name, weights=checkpoint(name), device="cpu", dtype="fp32").embed(images)
    pooled, patches = (
        rel_err(fp16.pooled, fp32.pooled),
        max(rel_err(a, b) for a, b in zip(fp16.patches, fp32.patches, strict=True)),
    )
    print(
        f"\n[cuda] {name}: fp16 vs fp32 relative error pooled {pooled:.2e}, patches {patches:.2e}; "
        f"cuda fp32 vs cpu fp32 {rel_err(fp32.pooled, cpu.pooled):.2e}"
    )
    assert pooled < FP16_REL_TOL and patches < FP16_REL_TOL
    assert rel_err(fp32.pooled, cpu.pooled) < 1e-3


REAL_SIZE = {
    # Qwen2.5-VL-7B's vision tower and DINOv2 ViT-L/14 (random weights: speed and numerics, not quality)
    "qwen2_5_vl": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    "dinov2": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_SIZE))
def test_real_size_tower_fp16(name, tmp_path):
    cls = encoders.get_encoder_class(name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls.model_class._from_config(cls.config_class(**REAL_SIZE[name])).eval()
    processor_kwargs = {
        **cls.default_processor_kwargs(),
        **cls.processor_overrides(
            **({"min_pixels": 448 * 448, "max_pixels": 448 * 448} if name == "qwen2_5_vl" else {})
        ),
    }
    cls(model, cls.processor_class(**processor_kwargs), device=torch.device("cuda"), revision="-").save(
        tmp_path
    )
    del model
    images = [smooth_image(448 + 16 * (i % 5), 448 - 16 * (i % 5), i) for i in range(32)]
    fp32 = encoders.load(name, weights=tmp_path, device="cuda", dtype="fp32").embed(images[:8]).pooled
    enc = encoders.load(name, weights=tmp_path, device="cuda")
    err = rel_err(enc.embed(images[:8]).pooled, fp32)
    prepared = [enc.preprocess(i) for i in images]
    opts = enc.options(patches=False)
    enc.embed_prepared(prepared, opts, batch_tokens=1 << 16)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        enc.embed_prepared(prepared, opts, batch_tokens=1 << 16)
    torch.cuda.synchronize()
    per_s = 3 * len(images) / (time.perf_counter() - t)
    tokens = sum(p.seq_len for p in prepared) / len(prepared)
    print(
        f"\n[cuda] real-size {name}: fp16 vs fp32 rel {err:.2e}; forward {per_s:.0f} images/s "
        f"({tokens:.0f} tokens/image, sdpa, {torch.cuda.get_device_name()})"
    )
    assert err < FP16_REL_TOL
