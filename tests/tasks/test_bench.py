"""Benchmark parts: the naive baseline runs transformers' own model, not towerflow's kernels."""

from __future__ import annotations

import pytest
import torch
from _support import PACKED

import encoders
from tasks.bench import naive_model


@pytest.mark.parametrize("name", [*PACKED, "dinov2"])
def test_naive_baseline_is_transformers_own_model_with_the_same_weights(name, checkpoint, images):
    enc = encoders.load(name, weights=checkpoint(name), dtype="fp32")
    naive = naive_model(enc)
    assert type(naive) is type(enc.model) and naive is not enc.model
    assert naive.config._attn_implementation == "sdpa"  # transformers' default, whatever the encoder runs
    mods = [(n, m) for n, m in enc.model.named_modules() if "forward" in vars(m)]  # towerflow's swaps
    assert [n for n, _ in mods] == (["patch_embed"] if name in PACKED else [])
    assert not [n for n, m in naive.named_modules() if "forward" in vars(m)]
    want = enc.model.state_dict()
    assert (
        all(torch.equal(v, want[k]) for k, v in naive.state_dict().items())
        and naive.state_dict().keys() == want.keys()
    )
    inputs = enc.processor(images=[images[0]], return_tensors="pt")
    with torch.inference_mode():
        if name in PACKED:
            a, b = (
                m(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
                for m in (enc.model, naive)
            )
        else:
            a, b = (m(pixel_values=inputs["pixel_values"]).pooler_output for m in (enc.model, naive))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
