"""Preprocessing is the model's own: equal to transformers' processor loaded independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support import PACKED, TOWERS, smooth_image
from transformers import AutoImageProcessor

import encoders

SIZES = [(31, 400), (120, 200), (300, 90), (64, 64), (719, 1283), (2000, 1500)]


def model_input(enc, prepared) -> np.ndarray:
    """What the tower is fed: prepared pixels are uint8, normalised in collate (encoders._pixels)."""
    collated = enc.collate([prepared])
    return (collated[0] if enc.name == "dinov2" else collated.pixel_values).numpy()


@pytest.mark.parametrize("name", TOWERS)
def test_prepared_equals_the_checkpoints_own_processor(name, checkpoint):
    directory = checkpoint(name)
    enc = encoders.load(name, weights=directory)
    processor = AutoImageProcessor.from_pretrained(str(directory), backend="pil")
    for i, (h, w) in enumerate(SIZES[:4]):
        image = smooth_image(h, w, i)
        prepared = enc.preprocess(image)
        ref = processor(images=[image], return_tensors="np")
        assert prepared.pixel_values.dtype == np.uint8  # 4x fewer bytes from decode to the device
        if name == "dinov2":
            np.testing.assert_array_equal(model_input(enc, prepared), ref["pixel_values"][0])
        else:
            np.testing.assert_array_equal(model_input(enc, prepared), ref["pixel_values"])
            assert prepared.grid_thw == tuple(ref["image_grid_thw"][0].tolist())


RELEASED = {
    # preprocessor_config.json as shipped with the released checkpoints
    "qwen2_5_vl": {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
    },
    "qwen3_vl": {
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
    },
    "glm4v": {
        "size": {"shortest_edge": 12544, "longest_edge": 9633792},
        "do_rescale": True,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Glm4vImageProcessor",
    },
    "dinov2": {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 256},
        "image_processor_type": "BitImageProcessor",
    },
}


@pytest.mark.parametrize("name", TOWERS)
def test_released_preprocessor_config_and_defaults_agree(name, checkpoint, tmp_path):
    """A released preprocessor_config.json, and no file at all (our defaults), preprocess identically."""
    import shutil

    with_file, without = tmp_path / "with", tmp_path / "without"
    shutil.copytree(checkpoint(name), with_file)
    shutil.copytree(checkpoint(name), without)
    (with_file / "preprocessor_config.json").write_text(json.dumps(RELEASED[name]))
    (without / "preprocessor_config.json").unlink()
    a, b = encoders.load(name, weights=with_file), encoders.load(name, weights=without)
    ref = AutoImageProcessor.from_pretrained(str(with_file), backend="pil")
    image = smooth_image(300, 520, 9)
    np.testing.assert_array_equal(model_input(a, a.preprocess(image)), model_input(b, b.preprocess(image)))
    np.testing.assert_array_equal(
        model_input(a, a.preprocess(image)).reshape(-1),
        np.asarray(ref(images=[image], return_tensors="np")["pixel_values"]).reshape(-1),
    )
    assert a.preprocess_hash == b.preprocess_hash


@pytest.mark.parametrize("name", TOWERS)
def test_num_tokens_matches_what_embedding_yields(name, checkpoint):
    enc = encoders.load(name, weights=checkpoint(name))
    for i, (h, w) in enumerate(SIZES):
        out = enc.embed([smooth_image(h, w, i)])
        assert enc.num_tokens(h, w) == len(out.patches[0]), (h, w)
        if name in PACKED:
            pre = enc.embed([smooth_image(h, w, i)], patch_level="pre_merger")
            assert enc.num_tokens(h, w, merged=False) == len(pre.patches[0])


@pytest.mark.parametrize("name", PACKED)
def test_min_max_pixels_bound_the_resized_image(name, checkpoint):
    enc = encoders.load(name, weights=checkpoint(name), min_pixels=112 * 112, max_pixels=200 * 200)
    patch = enc.model.config.patch_size
    for h, w in [(2000, 1500), (20, 40), (300, 90)]:
        gh, gw = enc.embed([smooth_image(h, w)], patch_level="pre_merger").grids[0]
        assert 112 * 112 * 0.8 <= gh * gw * patch * patch <= 200 * 200, (h, w, gh, gw)


def test_dinov2_decodes_big_jpegs_at_draft_scale_with_the_same_result_and_sizes(checkpoint, tmp_path):
    """DINOv2 resizes to a 256 short side anyway: a JPEG decoded at 1/4 scale gives (almost) the same
    vector, and the reported size stays the file's. Qwen (dynamic resolution) always decodes in full."""
    from storage.images import load_image

    path = tmp_path / "photo.jpg"
    smooth_image(1500, 2000, 7).save(path, quality=92)
    dino = encoders.load("dinov2", weights=checkpoint("dinov2"))
    drafted, full = dino.embed([str(path)]), dino.embed([load_image(str(path))])
    assert drafted.sizes == full.sizes == [(2000, 1500)]
    a, b = drafted.pooled[0], full.pooled[0]
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9999
    assert dino.processor_config()["decode_draft_short_side"] == 256
    qwen = encoders.load("qwen2_5_vl", weights=checkpoint("qwen2_5_vl"))
    np.testing.assert_array_equal(qwen.embed([str(path)]).pooled, qwen.embed([load_image(str(path))]).pooled)
