"""Acceptance: a directory of hostile and awkward files goes list -> read -> decode without surprises.

Every file either decodes to an RGB image of the right size and orientation, or fails with one
ImageDecodeError of the expected reason; nothing else raises, and no file takes long (a decompression
bomb is rejected from its header, before any pixel is allocated).
"""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from _support import smooth_image
from PIL import Image

from storage.images import ImageDecodeError, decode_image
from storage.sources import ListError, SourceItem, list_source, read_bytes, sniff_image_format

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height 1-bit pixels, with a one-row IDAT: a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    idat = zlib.compress(b"\x00" * (1 + (width + 7) // 8), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


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
        "bomb.png": (bomb_png(), "decompression_bomb"),
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
