"""Acceptance: a directory of hostile and awkward files goes list -> read -> decode without surprises.

Every file either decodes to an RGB image of the right size and orientation, or fails with one
ImageDecodeError of the expected reason; nothing else raises, and no file takes long (a decompression
bomb is rejected from its header, before any pixel is allocated).
"""

import io
import time

import numpy as np
import pytest
from _fuzz import bomb_png, encode
from _support import smooth_image
from PIL import Image

from storage.images import DecodeConfig, ImageDecodeError, decode_image, decode_image_limited
from storage.sources import ListError, SourceItem, list_source, read_bytes, sniff_image_format

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def exif_jpeg(orientation: int) -> bytes:
    """40x20 blue as stored, with a red block in the stored top-left corner."""
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif, quality=95)


def palette_png() -> bytes:
    """Palette image: index 1 (black) is transparent and sits in the top-left corner, the rest is red."""
    img = Image.new("P", (12, 8), 0)
    img.putpalette([*RED, 0, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    return encode(img, "PNG", transparency=1)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 12), c) for c in (RED, GREEN, BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


def noise_jpeg_png() -> tuple[bytes, bytes]:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    return encode(noise, "JPEG", quality=90), encode(noise, "PNG")


def close(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def corpus() -> dict[str, tuple[bytes, object]]:
    """name -> (bytes, expectation): a reason string for errors, or a check function for images."""
    jpeg, png = noise_jpeg_png()
    mid_grey = Image.fromarray(np.full((10, 20), 32896, dtype=np.uint16))  # 32896 / 257 = 128

    def check_cmyk(img):
        assert img.size == (24, 16) and close(img.getpixel((12, 8)), (255, 0, 255))  # C0 M255 Y0 K0 = magenta

    def check_16bit(img):
        assert img.size == (20, 10) and img.getpixel((5, 5)) == (128, 128, 128)

    def check_palette(img):
        assert img.size == (12, 8) and img.getpixel((0, 0)) == WHITE and img.getpixel((5, 5)) == RED

    def check_gif(img):
        assert img.size == (16, 12) and img.getpixel((8, 6)) == RED  # first frame only

    def check_exif6(img):  # rotate 90 degrees clockwise: stored top-left -> displayed top-right
        assert img.size == (20, 40)
        assert close(img.getpixel((16, 3)), RED) and close(img.getpixel((3, 3)), BLUE)
        assert close(img.getpixel((3, 36)), BLUE)

    def check_exif8(img):  # rotate 90 degrees counter-clockwise: stored top-left -> displayed bottom-left
        assert img.size == (20, 40)
        assert close(img.getpixel((3, 36)), RED) and close(img.getpixel((3, 3)), BLUE)
        assert close(img.getpixel((16, 36)), BLUE)

    def check_smooth(img):
        assert img.size == (64, 48)

    return {
        "zero.jpg": (b"", "empty"),
        "text.jpg": (b"this is a text file with an image name\n", "not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "bomb.png": (bomb_png(100_000, 100_000), "decompression_bomb"),
        "cmyk.jpg": (encode(Image.new("CMYK", (24, 16), (0, 255, 0, 0)), "JPEG", quality=95), check_cmyk),
        "grey16.png": (encode(mid_grey, "PNG"), check_16bit),
        "palette.png": (palette_png(), check_palette),
        "animated.gif": (animated_gif(), check_gif),
        "exif6.jpg": (exif_jpeg(6), check_exif6),
        "exif8.JPG": (exif_jpeg(8), check_exif8),
        "plain.webp": (encode(smooth_image(48, 64, 1), "WEBP", quality=90), check_smooth),
    }


def test_hostile_corpus(tmp_path):
    files = corpus()
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    assert Image.open(io.BytesIO(files["grey16.png"][0])).mode in ("I;16", "I")
    assert Image.open(io.BytesIO(files["cmyk.jpg"][0])).mode == "CMYK"
    assert Image.open(io.BytesIO(files["animated.gif"][0])).n_frames == 3
    assert len(files["bomb.png"][0]) < 1000

    listing = list(list_source(tmp_path))
    assert not [e for e in listing if isinstance(e, ListError)]
    assert sorted(i.uri.rsplit("/", 1)[-1] for i in listing) == sorted(files)

    embedded, errors = {}, {}
    for item in listing:
        assert isinstance(item, SourceItem)
        name = item.uri.rsplit("/", 1)[-1]
        start = time.perf_counter()
        data = read_bytes(item.uri)
        assert len(data) == item.size
        try:
            embedded[name] = decode_image(data, name=item.uri)
        except ImageDecodeError as e:  # the only exception allowed
            errors[name] = e.reason
        assert time.perf_counter() - start < 3.0, name

    assert len(embedded) + len(errors) == len(files)
    assert errors == {name: want for name, (_, want) in files.items() if isinstance(want, str)}
    for name, img in embedded.items():
        assert img.mode == "RGB", name
        files[name][1](img)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("text.jpg", None),
        ("bomb.png", "PNG"),
        ("cmyk.jpg", "JPEG"),
        ("animated.gif", "GIF"),
        ("plain.webp", "WEBP"),
    ],
)
def test_sniff_hostile(name, fmt):
    assert sniff_image_format(corpus()[name][0]) == fmt


# --- found by the fuzz corpus (tests/_fuzz.py, tests/flows/test_fuzz.py) ---------------------------------


@pytest.mark.parametrize(("size", "fmt"), [((1, 100_000), "PNG"), ((100_000, 1), "PNG"), ((1, 60_000), "GIF"),
                                           ((3, 700), "TIFF"), ((201, 1), "WEBP")])  # fmt: skip
def test_extreme_aspect_ratio_refused_from_the_header(load_spy, size, fmt):
    # A 1 x 100,000 PNG is 100 KB of pixels, far under the bomb limit, yet DINOv2's shortest-edge resize
    # turned it into 256 x 25.6M pixels (~20 GB) and the OOM killer took the decode worker (and the run).
    data = encode(Image.new("L", size, 7), fmt)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, name="sliver")
    assert err.value.reason == "extreme_aspect_ratio" and "sliver" in err.value.message
    assert load_spy == []


@pytest.mark.parametrize("size", [(1, 200), (200, 1), (1, 150), (2, 399)])
def test_aspect_ratio_up_to_the_limit_decodes(size):
    # Qwen2.5-VL, Qwen3-VL and GLM-4V refuse only above 200:1, so the decode limit rejects nothing they take.
    img = decode_image(encode(Image.new("RGB", size, (9, 8, 7)), "PNG"))
    assert img.size == size and img.getpixel((0, 0)) == (9, 8, 7)


def test_aspect_ratio_limit_is_configurable():
    data = encode(Image.new("L", (1, 1000)), "PNG")
    assert decode_image(data, DecodeConfig(max_aspect_ratio=None)).size == (1, 1000)
    assert decode_image(data, DecodeConfig(max_aspect_ratio=1000)).size == (1, 1000)
    with pytest.raises(ImageDecodeError, match="extreme_aspect_ratio"):
        decode_image(data, DecodeConfig(max_aspect_ratio=999))
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        DecodeConfig(max_aspect_ratio=0.5)


def test_extreme_aspect_ratio_through_the_time_limited_path():
    # what the decode task calls: the same refusal, not a timeout or a raw Pillow error
    with pytest.raises(ImageDecodeError) as err:
        decode_image_limited(encode(Image.new("1", (100_000, 1)), "PNG"), DecodeConfig(timeout_s=10))
    assert err.value.reason == "extreme_aspect_ratio"
