"""Packed varlen attention: the maths of transformers' per-window sdpa, default only where it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _support import PACKED

import encoders
from encoders import _attention
from encoders._attention import VARLEN_ATTENTION, default_packed_attention, packed_attention_forward
from encoders.qwen2_5_vl import pad_mlp

LENGTHS = [5, 64, 1, 17]  # unequal sequences, one of a single token


def block_diagonal_reference(q, k, v, lengths, scale):
    """One dense sdpa call with a block-diagonal mask: independent of any splitting by cu_seqlens."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (seq[:, None] == seq[None, :]).to(q.device)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)


def random_packed(lengths, heads=2, dim=16, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, sum(lengths), dim, generator=gen).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def call_packed(q, k, v, cu, lengths, scale):
    out, weights = packed_attention_forward(
        None, q, k, v, None, scaling=scale, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=max(lengths), max_length_k=max(lengths), is_causal=False,
    )  # fmt: skip
    assert weights is None
    return out


@pytest.mark.parametrize("scale", [None, 0.3])
def test_packed_attention_is_block_diagonal_attention(scale):
    q, k, v, cu = random_packed(LENGTHS)
    out = call_packed(q, k, v, cu, LENGTHS, scale)
    assert out.shape == (1, sum(LENGTHS), 2, 16)  # transformers' layout: (batch, seq, heads, dim)
    want = block_diagonal_reference(q, k, v, LENGTHS, scale).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_without_cu_seqlens_it_is_plain_sdpa():
    """A non-packed model given this name (e.g. DINOv2 inside `dual`) must still attend correctly."""
    q, k, v, _ = random_packed([12])
    out, _ = packed_attention_forward(None, q, k, v, None, scaling=None, is_causal=False)
    want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_cpu_default_is_transformers_sdpa(checkpoint):
    """The flash kernel needs CUDA and fp16/bf16: elsewhere the packed towers keep transformers' default."""
    assert default_packed_attention(torch.device("cpu"), torch.float16) is None
    assert default_packed_attention(torch.device("cpu"), torch.float32) is None
    enc = encoders.load("qwen2_5_vl", weights=checkpoint("qwen2_5_vl"), device="cpu")
    assert enc.model.config._attn_implementation == "sdpa"


def _outputs(out) -> dict[str, torch.Tensor]:
    got = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    for i, f in enumerate(getattr(out, "deepstack_features", None) or []):
        got[f"deepstack_{i}"] = f
    return got


@pytest.mark.parametrize("name", PACKED)
def test_packed_tower_equals_transformers_sdpa(name, checkpoint, images, monkeypatch):
    """Through transformers' own classes: varlen attention with host-built cu_seqlens == sdpa per window."""
    sdpa = encoders.load(name, weights=checkpoint(name), device="cpu", attn_implementation="sdpa")
    varlen = encoders.load(name, weights=checkpoint(name), device="cpu", attn_implementation=VARLEN_ATTENTION)
    assert varlen.model.config._attn_implementation == VARLEN_ATTENTION
    assert all(b.attn.config._attn_implementation == VARLEN_ATTENTION for b in varlen.model.blocks)
    packs: list[int] = []
    reference = _attention._reference_attention
    monkeypatch.setattr(
        _attention, "_reference_attention", lambda q, *a: packs.append(a[2].numel() - 1) or reference(q, *a)
    )
    inputs = varlen.collate([varlen.preprocess(i) for i in images])
    got = _outputs(varlen.run_collated(inputs))
    with torch.inference_mode():  # transformers computes cu_seqlens, windows, positions itself here
        want = _outputs(sdpa.model(inputs.pixel_values, grid_thw=inputs.grid_thw))
    assert len(packs) == len(varlen.model.blocks) and max(packs) >= len(images)  # one call per layer
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k} {m}")


def test_packed_pre_merger_states_match(checkpoint, images):
    """The user-facing embed path (window order undone, GLM's hook) is unchanged by the attention."""
    for name in PACKED:
        a = encoders.load(name, weights=checkpoint(name), device="cpu", attn_implementation="sdpa")
        b = encoders.load(name, weights=checkpoint(name), device="cpu", attn_implementation=VARLEN_ATTENTION)
        x, y = (e.embed(images, patch_level="pre_merger", output="torch") for e in (a, b))
        for pa, pb in zip(x.patches, y.patches, strict=True):
            torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-4)


def test_padded_mlp_is_the_same_model(checkpoint, images, tmp_path):
    """Qwen2.5-VL's MLP padded for tensor-core GEMMs: same outputs, same state_dict, same saved checkpoint."""
    enc = encoders.load("qwen2_5_vl", weights=checkpoint("qwen2_5_vl"), device="cpu")
    inputs = enc.collate([enc.preprocess(i) for i in images])
    want = enc.run_collated(inputs).pooler_output
    state = {k: v.clone() for k, v in enc.model.state_dict().items()}
    width = enc.model.blocks[0].mlp.gate_proj.out_features
    assert all(pad_mlp(b.mlp, 48) for b in enc.model.blocks)  # 64 -> 96
    assert enc.model.blocks[0].mlp.padded_down_weight.shape[1] == 96 > width
    torch.testing.assert_close(enc.run_collated(inputs).pooler_output, want, atol=1e-5, rtol=1e-5)
    after = enc.model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)
    enc.save(tmp_path)
    again = encoders.load("qwen2_5_vl", weights=tmp_path, device="cpu")
    torch.testing.assert_close(again.run_collated(inputs).pooler_output, want, atol=1e-5, rtol=1e-5)


gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and _attention.varlen_supported(torch.device("cuda"), torch.float16)),
    reason="needs a CUDA device where PyTorch's flash varlen kernel runs",
)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype):
    lengths = [64] * 30 + [1024, 7, 300]  # Qwen2.5-VL-like windows and whole images
    q, k, v, cu = random_packed(lengths, heads=16, dim=80, dtype=dtype, device="cuda")
    out = call_packed(q, k, v, cu, lengths, 80**-0.5)
    want = block_diagonal_reference(q, k, v, lengths, 80**-0.5).transpose(1, 2)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_cuda_default_is_varlen(checkpoint):
    enc = encoders.load("qwen3_vl", weights=checkpoint("qwen3_vl"), device="cuda")
    assert enc.model.config._attn_implementation == VARLEN_ATTENTION
    fp32 = encoders.load("qwen3_vl", weights=checkpoint("qwen3_vl"), device="cuda", dtype="fp32")
    assert fp32.model.config._attn_implementation == "sdpa"  # the flash kernel has no fp32


@pytest.mark.gpu
@pytest.mark.slow
@gpu
def test_cuda_compiled_blocks_match(checkpoint, images):
    """The opt-in compiled blocks compute the same tower (fp16 kernels differ, hence a tolerance)."""
    enc = encoders.load("qwen2_5_vl", weights=checkpoint("qwen2_5_vl"), device="cuda")
    inputs = enc.collate([enc.preprocess(i) for i in images])
    want = enc.run_collated(inputs).pooler_output.float()
    enc.compile_blocks()
    for _ in range(2):  # the first call compiles, the second runs the cached graph
        got = enc.run_collated(inputs).pooler_output.float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
