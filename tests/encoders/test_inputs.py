"""Every input kind and image mode reaches the tower as the same RGB image; non-images fail clearly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from _support import smooth_image
from PIL import Image

import encoders
from storage.images import ImageDecodeError


@pytest.fixture(scope="module")
def enc(checkpoint):
    return encoders.load("qwen2_5_vl", weights=checkpoint("qwen2_5_vl"))


@pytest.fixture(scope="module")
def rgb():
    return smooth_image(90, 130, 5)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_every_input_kind_gives_the_same_vector(enc, rgb, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(rgb))
    kinds = [str(path), path, f"file://{path}", png_bytes(rgb), rgb, np.asarray(rgb)]
    out = enc.embed(kinds)
    for i in range(1, len(kinds)):
        np.testing.assert_array_equal(out.pooled[i], out.pooled[0])
    assert out.sizes == [(130, 90)] * len(kinds)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_is_converted(enc, rgb, mode):
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        assert img.mode.startswith("I;16")
        expected = rgb.convert("L").convert("RGB")
    elif mode == "RGBA":
        img = rgb.convert("RGBA")
        expected = rgb
    else:
        img = rgb.convert(mode)
        expected = img.convert("RGB")
    out = enc.embed([img, expected])
    assert np.isfinite(out.pooled).all()
    np.testing.assert_allclose(out.pooled[0], out.pooled[1], atol=1e-5)


def test_rgba_transparency_is_composited_on_white(enc):
    clear = Image.new("RGBA", (64, 64), (10, 200, 30, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    out = enc.embed([clear, white])
    np.testing.assert_allclose(out.pooled[0], out.pooled[1], atol=1e-6)


def test_exif_orientation_is_applied(enc, rgb):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rgb.save(buf, format="JPEG", exif=exif, quality=95)
    out = enc.embed([buf.getvalue()])
    assert out.sizes == [(90, 130)]
    assert out.grids[0][0] > out.grids[0][1]  # now taller than wide


def test_a_file_that_is_not_an_image_fails_clearly(enc, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("hello, not a jpeg")
    with pytest.raises(ImageDecodeError, match="notes.jpg") as err:
        enc.embed([str(bad)])
    assert err.value.reason == "not_an_image"


def test_missing_path_and_wrong_type(enc, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        enc.embed([tmp_path / "missing.png"])
    with pytest.raises(TypeError):
        enc.embed([42])


@pytest.mark.parametrize("kind", ["pil", "array"])
def test_an_in_memory_sliver_is_refused_before_any_resize(kind, checkpoint):
    # DINOv2 resizes the shortest edge to 256: 1 x 100,000 would become 256 x 25.6M pixels (~20 GB)
    enc = encoders.load("dinov2", checkpoint("dinov2"))
    arr = np.zeros((1, 100_000, 3), np.uint8)
    image = Image.fromarray(arr) if kind == "pil" else arr
    with pytest.raises(ImageDecodeError, match="more elongated than 200:1") as err:
        enc.embed([image])
    assert err.value.reason == "extreme_aspect_ratio"
