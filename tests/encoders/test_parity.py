"""A packed, batched embedding equals transformers' own per-image forward (processor + model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _support import PACKED
from safetensors.torch import load_file
from transformers import AutoImageProcessor

import encoders
from encoders import _packed

TOL = 1e-4


def reference_tower(name: str, directory):
    """transformers' own loading of the checkpoint directory, independent of towerflow's reader."""
    cls = encoders.get_encoder_class(name)
    model = cls.model_class.from_pretrained(str(directory)).eval()
    return model, AutoImageProcessor.from_pretrained(str(directory), backend="pil")


def reference_packed(name: str, directory, image) -> tuple[torch.Tensor, tuple[int, int]]:
    model, processor = reference_tower(name, directory)
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    _, h, w = inputs["image_grid_thw"][0].tolist()
    return out.pooler_output, (h // 2, w // 2)


def reference_dinov2(directory, image) -> torch.Tensor:
    model, processor = reference_tower("dinov2", directory)
    with torch.no_grad():
        return model(**processor(images=[image], return_tensors="pt")).last_hidden_state[0]


@pytest.mark.parametrize("name", PACKED)
def test_packed_batch_equals_per_image_forward(name, checkpoint, images):
    directory = checkpoint(name)
    enc = encoders.load(name, weights=directory, dtype="fp32")
    out = enc.embed(images, batch_tokens=1 << 20)  # all three in one packed forward
    assert out.pooled.shape == (3, enc.dim)
    for i, image in enumerate(images):
        tokens, grid = reference_packed(name, directory, image)
        assert out.grids[i] == grid
        np.testing.assert_allclose(out.patches[i], tokens.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(out.pooled[i], tokens.mean(0).numpy(), atol=TOL, rtol=0)


def test_dinov2_batch_equals_per_image_forward(checkpoint, images):
    directory = checkpoint("dinov2")
    enc = encoders.load("dinov2", weights=directory, dtype="fp32")
    out = enc.embed(images)
    for i, image in enumerate(images):
        states = reference_dinov2(directory, image)
        np.testing.assert_allclose(out.pooled[i], states[0].numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(out.patches[i], states[1:].numpy(), atol=TOL, rtol=0)
        assert out.grids[i] == (16, 16)


def test_dual_equals_towers_plus_fusion_by_hand(checkpoint, images):
    directory = checkpoint("dual")
    enc = encoders.load("dual", weights=directory, dtype="fp32")
    out = enc.embed(images)
    s = load_file(str(directory / "fusion.safetensors"))
    for i, image in enumerate(images):
        q = reference_packed("qwen2_5_vl", directory / "qwen2_5_vl", image)[0].mean(0)
        d = reference_dinov2(directory / "dinov2", image)[0]
        pq = q @ s["proj_a.weight"].T + s["proj_a.bias"]
        pd = d @ s["proj_b.weight"].T + s["proj_b.bias"]
        hidden = torch.nn.functional.gelu(torch.cat([pq, pd]) @ s["gate.0.weight"].T + s["gate.0.bias"])
        w = torch.softmax(hidden @ s["gate.2.weight"].T + s["gate.2.bias"], dim=-1)
        np.testing.assert_allclose(out.fusion_weights[i], w.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(out.pooled[i], (w[0] * pq + w[1] * pd).numpy(), atol=TOL, rtol=0)
        assert out.extras["dinov2_patches"][i].shape == (256, 32)


def test_dual_without_fusion_is_concat_of_normalised_vectors(tmp_path, images):
    encoders.get_encoder_class("dual").write_tiny_checkpoint(tmp_path, fusion_dim=None)
    enc = encoders.load("dual", weights=tmp_path, dtype="fp32")
    out = enc.embed(images[:2])
    q = encoders.load("qwen2_5_vl", weights=tmp_path / "qwen2_5_vl").embed(images[:2]).pooled
    d = encoders.load("dinov2", weights=tmp_path / "dinov2").embed(images[:2]).pooled
    expected = np.concatenate(
        [q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)], 1
    )
    np.testing.assert_allclose(out.pooled, expected, atol=TOL)
    np.testing.assert_allclose(out.fusion_weights, 0.5)


def to_block_order(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    d = x.shape[-1]
    return x.reshape(h // 2, 2, w // 2, 2, d).permute(0, 2, 1, 3, 4).reshape(h * w, d)


@pytest.mark.parametrize("name", PACKED)
def test_pre_merger_tokens_are_row_major_and_feed_the_merger(name, checkpoint, images):
    """Putting the pre-merger tokens back through the model's own merger gives the merged tokens."""
    enc = encoders.load(name, weights=checkpoint(name), dtype="fp32")
    merged = enc.embed(images, output="torch")
    pre = enc.embed(images, patch_level="pre_merger", output="torch")
    model = enc.model
    for i in range(len(images)):
        h, w = pre.grids[i]
        assert (h // 2, w // 2) == merged.grids[i]
        blocks = to_block_order(pre.patches[i], h, w)
        with torch.no_grad():
            if name == "glm4v":
                x = blocks.view(-1, 2, 2, blocks.shape[-1]).permute(0, 3, 1, 2)
                again = model.merger(model.downsample(x).view(-1, model.config.out_hidden_size))
            else:
                again = model.merger(blocks)
        torch.testing.assert_close(again, merged.patches[i], atol=TOL, rtol=0)


def test_qwen3_deepstack_matches_reference(checkpoint, images):
    directory = checkpoint("qwen3_vl")
    enc = encoders.load("qwen3_vl", weights=directory, dtype="fp32")
    out = enc.embed(images, deepstack=True)
    model, processor = reference_tower("qwen3_vl", directory)
    for i, image in enumerate(images):
        inputs = processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            ref = model(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).deepstack_features
        assert out.extras["deepstack"][i].shape == (len(ref), *ref[0].shape)
        np.testing.assert_allclose(out.extras["deepstack"][i], torch.stack(ref).numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", PACKED)
def test_patch_embedding_runs_as_a_linear_layer_with_the_conv_weights(name, checkpoint):
    """The tower's Conv3d patch embedding (kernel == stride) runs as F.linear: same outputs, same weights."""
    enc = encoders.load(name, weights=checkpoint(name), dtype="fp32")
    embed = enc.model.patch_embed
    assert embed.forward.__func__ is _packed._linear_patch_embed_forward  # applied by the encoder
    cols = embed.proj.weight[0].numel()
    x = torch.randn(300, cols, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        conv = type(embed).forward(embed, x)  # transformers' own Conv3d path
        torch.testing.assert_close(embed(x), conv, atol=1e-5, rtol=1e-5)
    assert enc.model.state_dict().keys() == type(enc.model)(enc.config).state_dict().keys()


def test_a_patch_conv_that_is_not_one_gemm_is_left_alone():
    padded = torch.nn.Module()
    padded.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), padding=(0, 1, 1))
    overlapping = torch.nn.Module()
    overlapping.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 2, 2))
    assert not _packed.linear_patch_embed(padded) and not _packed.linear_patch_embed(overlapping)
    assert "forward" not in vars(padded) and "forward" not in vars(overlapping)
