"""Checkpoints: vision-only and full-VLM layouts, both key prefixes, vision shards only, clear refusals."""

from __future__ import annotations

import json
import shutil

import fsspec
import numpy as np
import pytest
import torch
from _support import ENCODERS, TOWERS
from safetensors.torch import load_file, save_file

import encoders
from encoders import CheckpointError, UnknownEncoderError

NON_VISION_SHARD = "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("name", ENCODERS)
def test_vlm_layout_equals_vision_layout(name, checkpoint, images):
    vision = encoders.load(name, weights=checkpoint(name, "vision"))
    vlm = encoders.load(name, weights=checkpoint(name, "vlm"))
    assert vision.revision == vlm.revision
    np.testing.assert_array_equal(vision.embed(images[:2]).pooled, vlm.embed(images[:2]).pooled)


def vlm_root(directory, name):
    return directory / "qwen2_5_vl" if name == "dual" else directory


@pytest.mark.parametrize("name", TOWERS)
def test_vlm_layout_never_opens_the_non_vision_shard(name, checkpoint, tmp_path, images):
    """The language shard is deleted (the index still names it): loading must not need it."""
    src = checkpoint(name, "vlm")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert NON_VISION_SHARD in index["weight_map"].values()
    directory = tmp_path / "ckpt"
    shutil.copytree(src, directory)
    (directory / NON_VISION_SHARD).unlink()
    enc = encoders.load(name, weights=directory)
    assert enc.embed(images[:1]).pooled.shape == (1, enc.dim)


def test_missing_vision_shard_is_named(checkpoint, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_5_vl", "vlm"), directory)
    (directory / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        encoders.load("qwen2_5_vl", weights=directory)


@pytest.mark.parametrize("prefix", ["visual.", "model.visual."])
def test_both_key_layouts_in_the_wild(prefix, checkpoint, tmp_path, images):
    """Released Qwen2.5-VL uses `visual.*`; transformers' current classes save `model.visual.*`."""
    src = checkpoint("qwen2_5_vl", "vlm")
    directory = tmp_path / "ckpt"
    shutil.copytree(src, directory)
    shard = directory / "model-00001-of-00002.safetensors"
    tensors = {prefix + k.removeprefix("visual."): v for k, v in load_file(str(shard)).items()}
    save_file(tensors, str(shard))
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {
        (prefix + k.removeprefix("visual.") if k.startswith("visual.") else k): v
        for k, v in index["weight_map"].items()
    }
    index_path.write_text(json.dumps(index))
    enc = encoders.load("qwen2_5_vl", weights=directory)
    ref = encoders.load("qwen2_5_vl", weights=checkpoint("qwen2_5_vl"))
    assert enc.revision == ref.revision
    np.testing.assert_array_equal(enc.embed(images[:1]).pooled, ref.embed(images[:1]).pooled)


def test_save_roundtrip(checkpoint, tmp_path, images):
    enc = encoders.load("qwen3_vl", weights=checkpoint("qwen3_vl", "vlm"))
    encoders.save(enc, tmp_path / "saved")
    again = encoders.load("qwen3_vl", weights=tmp_path / "saved")
    assert again.revision == enc.revision and again.preprocess_hash == enc.preprocess_hash
    np.testing.assert_array_equal(again.embed(images).pooled, enc.embed(images).pooled)


def test_fsspec_url_loads_through_the_cache(checkpoint, images):
    src = checkpoint("glm4v", "vlm")
    mem = fsspec.filesystem("memory")
    for f in src.iterdir():
        mem.pipe(f"/glm-ckpt/{f.name}", f.read_bytes())
    mem.rm(f"/glm-ckpt/{NON_VISION_SHARD}")
    enc = encoders.load("glm4v", weights="memory://glm-ckpt")
    ref = encoders.load("glm4v", weights=src)
    np.testing.assert_array_equal(enc.embed(images[:1]).pooled, ref.embed(images[:1]).pooled)


def test_file_url(checkpoint):
    enc = encoders.load("dinov2", weights=f"file://{checkpoint('dinov2')}")
    assert enc.dim == 32


def test_pickle_checkpoint_is_refused(tmp_path, checkpoint):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint("dinov2"), directory)
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only safetensors.*pytorch_model\.bin"):
        encoders.load("dinov2", weights=directory)


def test_wrong_family_is_named(checkpoint):
    with pytest.raises(CheckpointError, match=r"'dinov2' model; glm4v expects"):
        encoders.load("glm4v", weights=checkpoint("dinov2"))


def test_architecture_mismatch_names_missing_tensors(tmp_path, checkpoint):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_5_vl"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["depth"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\), e\.g\. blocks\.2\."):
        encoders.load("qwen2_5_vl", weights=directory)


def test_shape_mismatch_is_named(tmp_path, checkpoint):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint("dinov2"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["mlp_ratio"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        encoders.load("dinov2", weights=directory)


def test_missing_directory_and_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        encoders.load("dinov2", weights=tmp_path / "nope")
    with pytest.raises(
        UnknownEncoderError, match="registered encoders: dinov2, dual, glm4v, qwen2_5_vl, qwen3_vl"
    ):
        encoders.load("clip", weights=tmp_path)


def test_empty_directory_says_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        encoders.load("qwen3_vl", weights=tmp_path)


def test_preprocessing_overrides_reach_the_processor(checkpoint, images):
    enc = encoders.load("qwen2_5_vl", weights=checkpoint("qwen2_5_vl"), max_pixels=56 * 56 * 2)
    grid = enc.embed(images[:1]).grids[0]
    assert grid[0] * grid[1] * 4 * 14 * 14 <= 56 * 56 * 2
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_pixels'"):
        encoders.load("dinov2", weights=checkpoint("dinov2"), max_pixels=10)


@pytest.mark.parametrize("name", ENCODERS)
def test_preprocessor_only_reads_no_tensors(name, checkpoint, tmp_path, images):
    """Decode workers preprocess without weights: with every safetensors file gone it still works."""
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint(name), directory)
    for f in directory.rglob("*.safetensors"):
        f.unlink()
    pre = encoders.load_preprocessor(name, weights=directory)
    full = encoders.load(name, weights=checkpoint(name))
    a, b = pre.preprocess(images[0]), full.preprocess(images[0])
    assert a.seq_len == b.seq_len and pre.preprocess_hash == full.preprocess_hash
    assert pre.num_tokens(300, 200) == full.num_tokens(300, 200)
    with pytest.raises(RuntimeError, match="only preprocesses"):
        pre.embed(images[:1])


@pytest.mark.parametrize("name", ENCODERS)
def test_preprocessor_with_revision_matches_the_loaded_encoder(name, checkpoint):
    """A planner learns revision, preprocessing hash and dim without building the model."""
    pre = encoders.load_preprocessor(name, weights=checkpoint(name, "vlm"), revision=True)
    full = encoders.load(name, weights=checkpoint(name))
    assert (pre.revision, pre.preprocess_hash, pre.dim) == (full.revision, full.preprocess_hash, full.dim)


class _Exploit:
    """A pickle that runs code when unpickled without restriction."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_loads_only_when_allowed_and_only_tensors(tmp_path, checkpoint, images):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint("dinov2"), directory)
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    allowed = encoders.load("dinov2", weights=directory, allow_pickle=True)
    reference = encoders.load("dinov2", weights=checkpoint("dinov2"))
    assert allowed.revision == reference.revision
    np.testing.assert_array_equal(allowed.embed(images[:1]).pooled, reference.embed(images[:1]).pooled)

    marker = tmp_path / "pwned"
    torch.save({"embeddings.cls_token": _Exploit(marker)}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\)"):
        encoders.load("dinov2", weights=directory, allow_pickle=True)
    assert not marker.exists()  # the payload never ran
