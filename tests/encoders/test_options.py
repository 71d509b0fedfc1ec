"""Pooling, output kinds, token-budget batching and reduced precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _support import ENCODERS

import encoders
from encoders._base import CPU_BATCH_TOKENS, DEFAULT_BATCH_TOKENS, default_batch_tokens, plan_batches


@pytest.fixture(scope="module")
def qwen(checkpoint):
    return encoders.load("qwen2_5_vl", weights=checkpoint("qwen2_5_vl"))


def test_pooling_kinds(qwen, checkpoint, images):
    none = qwen.embed(images, pooling="none")
    assert none.pooled is None and len(none.patches) == 3
    mean, mx = qwen.embed(images).pooled, qwen.embed(images, pooling="max").pooled
    for i, tokens in enumerate(none.patches):
        np.testing.assert_allclose(mean[i], tokens.mean(0), atol=1e-6)
        np.testing.assert_allclose(mx[i], tokens.max(0), atol=1e-6)
    dino = encoders.load("dinov2", weights=checkpoint("dinov2"))
    out = dino.embed(images)  # cls is DINOv2's default
    np.testing.assert_allclose(out.pooled, dino.embed(images, pooling="cls").pooled)
    assert not np.allclose(out.pooled, dino.embed(images, pooling="mean").pooled)


def test_bad_options_fail_before_any_work(qwen):
    with pytest.raises(ValueError, match="qwen2_5_vl has no CLS token"):
        qwen.embed(["/does/not/exist.png"], pooling="cls")
    with pytest.raises(ValueError, match="unknown pooling 'avg'"):
        qwen.embed([], pooling="avg")
    with pytest.raises(ValueError, match="unknown output"):
        qwen.embed([], output="pandas")
    with pytest.raises(ValueError, match="no deepstack"):
        qwen.embed([], deepstack=True)


def test_output_kinds(qwen, images):
    as_np = qwen.embed(images)
    as_torch = qwen.embed(images, output="torch")
    as_list = qwen.embed(images, output="list")
    assert isinstance(as_torch.pooled, torch.Tensor) and isinstance(as_torch.patches[0], torch.Tensor)
    assert isinstance(as_list.pooled, list) and isinstance(as_list.patches[0][0], list)
    np.testing.assert_array_equal(as_torch.pooled.numpy(), as_np.pooled)
    np.testing.assert_allclose(np.array(as_list.pooled), as_np.pooled)


def test_patch_dtype(qwen, images):
    out = qwen.embed(images, patch_dtype="fp16")
    assert out.patches[0].dtype == np.float16 and out.pooled.dtype == np.float32


def test_empty_input(qwen):
    out = qwen.embed([])
    assert out.pooled.shape == (0, qwen.dim) and out.patches == [] and len(out) == 0


@pytest.mark.parametrize("name", ENCODERS)
def test_batching_by_token_budget_does_not_change_results(name, checkpoint, images):
    enc = encoders.load(name, weights=checkpoint(name))
    one_batch = enc.embed(images * 2, batch_tokens=1 << 20)
    many = enc.embed(images * 2, batch_tokens=1)  # every image alone
    np.testing.assert_allclose(one_batch.pooled, many.pooled, atol=1e-5)
    assert one_batch.grids == many.grids


def test_plan_batches_respects_budget_and_keys():
    assert plan_batches([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert plan_batches([10, 1, 1], 8) == [[0], [1, 2]]  # an oversize image goes alone
    assert plan_batches([1, 1, 1, 1], 100, keys=["a", "b", "a", "b"]) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="must be positive"):
        plan_batches([1], 0)


def test_forward_count_follows_the_budget(qwen, images, monkeypatch):
    sizes = []
    real = qwen.forward
    monkeypatch.setattr(qwen, "forward", lambda batch, opts: sizes.append(len(batch)) or real(batch, opts))
    costs = [qwen.preprocess(i).seq_len for i in images]
    qwen.embed(images, batch_tokens=costs[0] + costs[1])
    assert sizes == [2, 1]


def test_default_budget_follows_the_device(qwen, images, monkeypatch):
    """A CPU packs forwards that stay in cache; an accelerator packs large ones."""
    assert default_batch_tokens(torch.device("cpu")) == CPU_BATCH_TOKENS < DEFAULT_BATCH_TOKENS
    assert default_batch_tokens(torch.device("cuda")) == DEFAULT_BATCH_TOKENS
    tokens = []
    real = qwen.forward
    monkeypatch.setattr(
        qwen, "forward", lambda batch, opts: tokens.append(sum(p.seq_len for p in batch)) or real(batch, opts)
    )
    many = [images[i % len(images)] for i in range(40)]
    costs = [qwen.preprocess(i).seq_len for i in many]
    qwen.embed(many)  # no budget given: the CPU's
    assert sum(tokens) == sum(costs) > CPU_BATCH_TOKENS
    assert max(tokens) <= CPU_BATCH_TOKENS and len(tokens) == len(plan_batches(costs, CPU_BATCH_TOKENS))


BF16_REL_TOL = 5e-2  # stated tolerance: relative L2 error of pooled vectors, bf16 vs fp32 on CPU


@pytest.mark.parametrize("name", ENCODERS)
def test_bf16_on_cpu_stays_close_to_fp32(name, checkpoint, images):
    fp32 = encoders.load(name, weights=checkpoint(name), dtype="fp32").embed(images).pooled
    bf16_enc = encoders.load(name, weights=checkpoint(name), dtype="bf16")
    assert bf16_enc.dtype == torch.bfloat16
    bf16 = bf16_enc.embed(images).pooled
    rel = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    assert rel.max() < BF16_REL_TOL, rel


def test_unknown_dtype(checkpoint):
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        encoders.load("dinov2", weights=checkpoint("dinov2"), dtype="int8")


@pytest.mark.parametrize("name", ENCODERS)
def test_bare_forward_on_collated_inputs_matches_embed(name, checkpoint, images):
    """collate + run_collated is what benchmarks time as the ceiling: it must be the same forward."""
    enc = encoders.load(name, weights=checkpoint(name))
    prepared = [enc.preprocess(i) for i in images[:2]]
    out = enc.run_collated(enc.collate(prepared))
    if name == "dual":
        cls = out[1].last_hidden_state[:, 0].numpy()
        np.testing.assert_allclose(cls, enc.dino.embed(images[:2]).pooled, atol=1e-5)
        return
    got = out.last_hidden_state[:, 0] if name == "dinov2" else out.pooler_output
    want = enc.embed(images[:2], pooling="cls" if name == "dinov2" else "none", output="torch")
    expected = want.pooled if name == "dinov2" else torch.cat(want.patches)
    torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=0)
