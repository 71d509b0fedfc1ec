"""storage.images: hardened decoding. Every image is built here with Pillow (or by hand) in memory."""

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from storage.images import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_PIXELS,
    DecodeConfig,
    ImageDecodeError,
    decode_image,
    load_image,
    original_size,
    to_rgb,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def px(img: Image.Image, xy=(0, 0)) -> tuple:
    return tuple(img.getpixel(xy))


def reason_of(data: bytes, config: DecodeConfig | None = None) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(data, config or DecodeConfig(), name="sample.bin")
    assert "sample.bin" in str(exc.value)
    return exc.value


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built row by row so no large image is ever allocated."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- every pixel mode -------------------------------------------------------------------------------------


def test_mode_l():
    out = decode_image(encode(Image.new("L", (4, 3), 77), "PNG"))
    assert (out.mode, out.size, px(out)) == ("RGB", (4, 3), (77, 77, 77))


def test_mode_p():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    out = decode_image(encode(img, "PNG"))
    assert px(out) == (200, 10, 30)


def test_mode_p_with_transparency_composites_on_white():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    data = encode(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info["transparency"] == 0
    out = decode_image(data)
    assert px(out, (0, 0)) == (255, 255, 255)  # palette black, but transparent
    assert px(out, (1, 1)) == (200, 10, 30)


def test_mode_rgba_composites_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    out = decode_image(encode(img, "PNG"))
    assert px(out, (0, 0)) == (255, 255, 255)
    assert px(out, (1, 0)) == (10, 20, 30)
    assert all(126 <= c <= 128 for c in px(out, (2, 0)))  # half-transparent black on white -> mid grey


def test_mode_la_composites_on_white():
    img = Image.new("LA", (2, 1))
    img.putdata([(50, 0), (50, 255)])
    out = decode_image(encode(img, "PNG"))
    assert [px(out, (x, 0)) for x in range(2)] == [(255, 255, 255), (50, 50, 50)]


def test_mode_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r, g, b = px(decode_image(data), (8, 8))
    assert r > 240 and g < 15 and b > 240  # magenta


def test_mode_i16_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    out = decode_image(data)
    assert [px(out, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]  # Pillow's convert would give 255 x3


def test_mode_1_bit():
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    out = decode_image(encode(img, "PNG"))
    assert [px(out, (x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_to_rgb_wide_modes_scale_by_range():
    as_i = to_rgb(Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)))
    assert [px(as_i, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    unit = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert [px(unit, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = to_rgb(Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32)))
    assert [px(wide, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_to_rgb_returns_a_new_image():
    src = Image.new("RGB", (2, 2), (1, 2, 3))
    out = to_rgb(src)
    out.putpixel((0, 0), (9, 9, 9))
    assert out is not src and px(src) == (1, 2, 3)


# --- orientation, animation, detachment ---------------------------------------------------------------------


def test_exif_orientation_6_rotates():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red block top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    r, g, b = px(out, (16, 3))  # top-left of the stored image is now top-right
    assert r > 200 and b < 60


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_gives_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert px(decode_image(data), (4, 4)) == (255, 0, 0)


def test_result_is_detached_plain_rgb():
    data = bytearray(encode(Image.new("RGB", (4, 4), (9, 8, 7)), "PNG"))
    out = decode_image(data)
    data[:] = b"\x00" * len(data)
    assert type(out) is Image.Image and out.mode == "RGB" and px(out) == (9, 8, 7)
    assert getattr(out, "fp", None) is None


# --- rejections -------------------------------------------------------------------------------------------


def _noise(n=4000, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n // 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_is_rejected(fmt):
    data = encode(Image.fromarray(_noise()), fmt)
    err = reason_of(data[: len(data) // 2])
    assert err.reason == "truncated" and "truncated" in err.message


def test_truncated_webp_is_reported_as_corrupt():
    # Pillow's WebP plugin says "could not create decoder object", not "truncated".
    data = encode(Image.fromarray(_noise()), "WEBP")
    assert reason_of(data[: len(data) // 2]).reason == "corrupt"


def test_header_of_allowed_format_unreadable_is_corrupt():
    data = encode(Image.new("RGB", (8, 8)), "PNG")
    assert reason_of(data[:12]).reason == "corrupt"


@pytest.mark.parametrize(
    ("size", "max_pixels"),
    [
        ((4000, 4000), 10_000_000),  # under Pillow's warning limit: our own header check
        ((10000, 10000), 10_000_000),  # Pillow warns (over 89.5M), then our header check
        ((20000, 20000), 10_000_000),  # Pillow raises DecompressionBombError itself (over 179M)
        ((14000, 14000), DEFAULT_MAX_PIXELS),  # default config: 196M pixels
    ],
)
def test_decompression_bomb_rejected_before_allocating(load_spy, size, max_pixels):
    data = bilevel_png(*size)
    assert len(data) < 200_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning either
        err = reason_of(data, DecodeConfig(max_pixels=max_pixels))
    assert err.reason == "decompression_bomb"
    assert load_spy == []


def test_bomb_builder_makes_valid_pngs(load_spy):
    out = decode_image(bilevel_png(3000, 3000), DecodeConfig(max_pixels=10_000_000))
    assert out.size == (3000, 3000) and px(out, (2999, 2999)) == (0, 0, 0)
    assert set(load_spy) == {(3000, 3000)}


@pytest.mark.parametrize("fmt", ["ICO", "PPM"])
def test_format_not_allowed(fmt):
    err = reason_of(encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt))
    assert err.reason == "format_not_allowed" and fmt in err.message


def test_config_restricts_formats():
    data = encode(Image.new("RGB", (8, 8)), "JPEG")
    err = reason_of(data, DecodeConfig(formats=frozenset({"png"})))
    assert err.reason == "format_not_allowed" and "JPEG" in err.message
    assert DecodeConfig(formats=frozenset({"png"})).formats == {"PNG"}
    assert decode_image(data, DecodeConfig(formats=frozenset({"jpeg"}))).size == (8, 8)


@pytest.mark.parametrize(
    "data",
    [bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)), b"just some text\n" * 50],
    ids=["random", "text"],
)
def test_not_an_image(data):
    assert reason_of(data).reason == "not_an_image"


def test_empty():
    assert reason_of(b"").reason == "empty"


def test_error_is_a_picklable_value_error():
    err = pickle.loads(pickle.dumps(ImageDecodeError("truncated", "x.jpg: short")))
    assert isinstance(err, ValueError)
    assert (err.reason, err.message, str(err)) == ("truncated", "x.jpg: short", "truncated: x.jpg: short")


def test_refuses_to_run_with_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(Image.new("RGB", (2, 2)), "PNG"))


def test_pixel_limit_is_config_not_pillows_warning_threshold(monkeypatch):
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; DEFAULT_MAX_PIXELS is the latter.
    assert DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    inside_warning_zone = encode(Image.new("L", (40, 40), 5), "PNG")  # 1600 pixels: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert px(decode_image(inside_warning_zone, DecodeConfig(max_pixels=1600))) == (5, 5, 5)
        assert reason_of(inside_warning_zone, DecodeConfig(max_pixels=1599)).reason == "decompression_bomb"
        over_hard_limit = encode(Image.new("L", (50, 50)), "PNG")  # 2500 > 2 x 1000: Pillow raises
        assert reason_of(over_hard_limit, DecodeConfig(max_pixels=10_000)).reason == "decompression_bomb"


def test_globals_unchanged():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    for data, config in [
        (png, DecodeConfig(max_pixels=10)),
        (png[:40], DecodeConfig()),
        (bilevel_png(10000, 10000), DecodeConfig(max_pixels=10_000_000)),
        (bilevel_png(14000, 14000), DecodeConfig()),
    ]:
        with pytest.raises(ImageDecodeError):
            decode_image(data, config)
    assert decode_image(png).size == (8, 8)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"} == DEFAULT_FORMATS


# --- load_image ------------------------------------------------------------------------------------------


@pytest.fixture
def png_file(tmp_path):
    path = tmp_path / "pic.png"
    path.write_bytes(encode(Image.new("RGB", (5, 3), (10, 20, 30)), "PNG"))
    return path


@pytest.mark.parametrize(
    "as_input", [str, lambda p: p, lambda p: p.as_uri()], ids=["str", "Path", "file-uri"]
)
def test_load_image_paths(png_file, as_input):
    out = load_image(as_input(png_file))
    assert (out.mode, out.size, px(out)) == ("RGB", (5, 3), (10, 20, 30))


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_load_image_bytes(png_file, wrap):
    assert px(load_image(wrap(png_file.read_bytes()))) == (10, 20, 30)


def test_load_image_pil_image():
    src = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    out = load_image(src)
    assert (out.mode, px(out)) == ("RGB", (255, 255, 255))
    assert src.mode == "RGBA" and px(src) == (10, 20, 30, 0)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((3, 5, 3), (1, 2, 3), dtype=np.uint8), (1, 2, 3)),
        (np.full((3, 5), 42, dtype=np.uint8), (42, 42, 42)),
        (np.full((3, 5, 4), (1, 2, 3, 0), dtype=np.uint8), (255, 255, 255)),
    ],
    ids=["HxWx3", "HxW", "HxWx4"],
)
def test_load_image_numpy(array, expected):
    out = load_image(array)
    assert (out.mode, out.size, px(out, (4, 2))) == ("RGB", (5, 3), expected)


def test_load_image_numpy_rejects_bad_arrays():
    with pytest.raises(TypeError, match="uint8"):
        load_image(np.zeros((3, 5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((3, 5, 2), dtype=np.uint8))


def test_load_image_missing_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    for arg in (str(missing), missing, missing.as_uri()):
        with pytest.raises(FileNotFoundError, match="nope.jpg") as exc:
            load_image(arg)
        assert str(arg) in str(exc.value)


def test_load_image_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n" * 100)
    with pytest.raises(ImageDecodeError) as exc:
        load_image(path)
    assert exc.value.reason == "not_an_image" and "notes.txt" in str(exc.value)


def test_load_image_directory_is_read_failed(tmp_path):
    with pytest.raises(ImageDecodeError) as exc:
        load_image(tmp_path)
    assert exc.value.reason == "read_failed"


def test_load_image_applies_config(png_file):
    with pytest.raises(ImageDecodeError) as exc:
        load_image(png_file, DecodeConfig(max_pixels=10))
    assert exc.value.reason == "decompression_bomb"


@pytest.mark.parametrize("bad", [42, None, 3.5, ["a.png"]])
def test_load_image_unsupported_type(bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        load_image(bad)


def test_decode_time_limit_turns_a_slow_file_into_a_timeout_error():
    from storage.images import decode_image_limited

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    data = buf.getvalue()
    with pytest.raises(ImageDecodeError) as err:
        decode_image_limited(data, DecodeConfig(timeout_s=1e-4), name="slow.png")
    assert err.value.reason == "timeout" and "slow.png" in str(err.value)
    assert decode_image_limited(data, DecodeConfig(timeout_s=60)).size == (2000, 2000)  # the next one decodes
    assert decode_image_limited(data, DecodeConfig(timeout_s=None)).size == (2000, 2000)


def test_a_draft_decode_is_smaller_but_keeps_the_short_side_and_reports_the_file_size():
    from _support import smooth_image

    photo = smooth_image(1200, 1600, 4)
    jpeg, png = encode(photo, "JPEG", quality=92), encode(photo, "PNG")
    small = decode_image(jpeg, DecodeConfig(draft_short_side=256))
    assert small.size == (400, 300)  # scale 1/4: the largest that keeps the short side >= 256
    assert original_size(small) == (1600, 1200)
    full = decode_image(jpeg)
    assert full.size == original_size(full) == (1600, 1200)
    assert decode_image(png, DecodeConfig(draft_short_side=256)).size == (1600, 1200)  # JPEG only
    reduced = np.asarray(full.resize(small.size, Image.Resampling.BOX), np.float32)
    assert np.abs(np.asarray(small, np.float32) - reduced).mean() < 3  # the same picture, in 8-bit steps


def test_a_draft_decode_reports_the_upright_size_of_a_rotated_photo():
    from _support import smooth_image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright it is 1200 wide, 1600 tall
    data = encode(smooth_image(1200, 1600, 5), "JPEG", exif=exif.tobytes())
    img = decode_image(data, DecodeConfig(draft_short_side=256))
    assert img.size == (300, 400) and original_size(img) == (1200, 1600)
