"""A seeded fuzz corpus of hostile image files for the full-flow fuzz test (issue #7).

Valid seeds in every allowed format and many modes, byte- and structure-level mutants of them,
truncations, decompression bombs, huge EXIF, degenerate sizes, wrong extensions, non-image files and
unusual names. Each case says what the pipeline must make of it: EMBED (every model embeds it),
ERROR (a model-independent error row, with a known reason where the outcome is certain), ANY (either,
but never a crash, a hang or a silent drop) or UNLISTED (the listing skips it by design).
Deterministic for a seed; 150 files (146 listed), ~0.85 MB, generated in about a second.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _support import smooth_image
from PIL import Image

EMBED, ERROR, ANY, UNLISTED = "embed", "error", "any", "unlisted"
ORIENTATION, DESCRIPTION = 0x0112, 0x010E


@dataclass(frozen=True)
class FuzzCase:
    name: str  # path under the corpus root ("/" separates a subdirectory)
    data: bytes
    expect: str  # EMBED, ERROR, ANY or UNLISTED
    reason: str | None = None  # the decode reason an ERROR case must carry, where it is certain


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --- structure builders -----------------------------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk after the signature (stops at the first malformed length)."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def png_from(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(k, b) for k, b in chunks)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header claiming width x height 1-bit pixels, with a one-row IDAT: a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + (width + 7) // 8), 9)
    return png_from([(b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", b"")])


def ztxt_bomb_png() -> bytes:
    """A 4x4 PNG whose zTXt chunk inflates to 16 MB (Pillow caps text chunks; the image is fine)."""
    chunks = png_chunks(encode(Image.new("L", (4, 4), 9), "PNG"))
    text = b"Comment\x00\x00" + zlib.compress(b"\x00" * (16 << 20), 9)
    return png_from([chunks[0], (b"zTXt", text), *chunks[1:]])


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian bilevel TIFF claiming width x height with an 8-byte strip."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 1), (259, 3, 1), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, 8)]  # fmt: skip
    ifd_at, data_at = 8, 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        value = data_at if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, 1) + packed
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + b"\x00\x00\x00\x00" + b"\xaa" * 8


def patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0/SOF2 frame size (the header Pillow reads the size from)."""
    pos = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    return data[: pos + 5] + struct.pack(">HH", height, width) + data[pos + 9 :]


def patch_gif_screen(data: bytes, width: int, height: int) -> bytes:
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def patch_webp_lossless_size(data: bytes, width: int, height: int) -> bytes:
    """VP8L stores 14-bit width-1 / height-1 right after its 0x2f signature byte."""
    pos = data.index(b"VP8L") + 8
    assert data[pos] == 0x2F
    bits = int.from_bytes(data[pos + 1 : pos + 5], "little")
    bits = (bits & ~0xFFFFFFF) | (width - 1) | ((height - 1) << 14)
    return data[: pos + 1] + bits.to_bytes(4, "little") + data[pos + 5 :]


def exif_bytes(orientation: int, description_bytes: int = 0) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    if description_bytes:
        exif[DESCRIPTION] = "A" * description_bytes
    return exif.tobytes()


def ascii_orientation_exif() -> bytes:
    """EXIF whose Orientation entry has the wrong type: ASCII "six" instead of a SHORT."""
    entry = struct.pack("<HHI", ORIENTATION, 2, 4) + b"six\x00"
    return b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + entry + b"\x00" * 4


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        # a fixed timestamp: writestr(name) stamps the current time and the corpus must be deterministic
        info = zipfile.ZipInfo("photo.jpg", date_time=(2026, 1, 1, 0, 0, 0))
        z.writestr(info, encode(smooth_image(8, 8), "JPEG"))
    return buf.getvalue()


# --- seeds --------------------------------------------------------------------------------------------------


def seeds() -> dict[str, bytes]:
    """name -> bytes of a valid image; names carry the format's usual extension."""
    rgb = smooth_image(40, 56, 1)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    grey16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    pal = rgb.quantize(colors=32)
    frames = [smooth_image(32, 48, s) for s in (2, 3, 4)]
    anim = {"save_all": True, "append_images": frames[1:], "duration": 40, "loop": 0}
    return {
        "seed.jpg": encode(rgb, "JPEG", quality=85),
        "seed-progressive.jpg": encode(rgb, "JPEG", quality=80, progressive=True),
        "seed-grey.jpg": encode(rgb.convert("L"), "JPEG"),
        "seed-cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "seed-exif6.jpg": encode(rgb, "JPEG", exif=exif_bytes(6)),
        "seed.png": encode(rgb, "PNG"),
        "seed-rgba.png": encode(rgba, "PNG"),
        "seed-palette.png": encode(pal, "PNG", transparency=0),
        "seed-la.png": encode(rgba.convert("LA"), "PNG"),
        "seed-16bit.png": encode(grey16, "PNG"),
        "seed-1bit.png": encode(rgb.convert("1"), "PNG"),
        "seed-interlaced.png": encode(rgb, "PNG", interlace=1),
        "seed.gif": encode(rgb, "GIF"),
        "seed-animated.gif": encode(frames[0], "GIF", **anim),
        "seed.tif": encode(rgb, "TIFF"),
        "seed-lzw.tif": encode(rgb, "TIFF", compression="tiff_lzw"),
        "seed-deflate.tiff": encode(rgba, "TIFF", compression="tiff_adobe_deflate"),
        "seed-cmyk.tif": encode(rgb.convert("CMYK"), "TIFF", compression="packbits"),
        "seed-16bit.tif": encode(grey16, "TIFF"),
        "seed-float.tif": encode(rgb.convert("F"), "TIFF"),
        "seed-multipage.tif": encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "seed.webp": encode(rgb, "WEBP", quality=80),
        "seed-lossless.webp": encode(rgba, "WEBP", lossless=True),
        "seed-animated.webp": encode(frames[0], "WEBP", **anim),
        "seed.bmp": encode(rgb, "BMP"),
        "seed-1bit.bmp": encode(rgb.convert("1"), "BMP"),
    }


def special_cases() -> list[FuzzCase]:
    """Hand-built hostile and awkward files with a certain outcome."""
    tiny = smooth_image(24, 24, 5)
    one = Image.new("RGB", (1, 1), (200, 30, 60))
    jpeg, png, gif, webp = (encode(tiny, f) for f in ("JPEG", "PNG", "GIF", "WEBP"))
    cases = [FuzzCase(f"1x1.{ext}", encode(one, fmt), EMBED)
             for fmt, ext in [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"),
                              ("TIFF", "tif"), ("BMP", "bmp")]]  # fmt: skip
    sliver = Image.new("L", (1, 100_000), 128)
    cases += [
        # degenerate geometry: over the 200:1 aspect ratio every tower refuses (and DINOv2's resize
        # would inflate to 256 x 25.6M pixels); just under it, a real sliver that must embed
        FuzzCase("1x100000.png", encode(sliver, "PNG"), ERROR, "extreme_aspect_ratio"),
        FuzzCase("100000x1.png", encode(sliver.transpose(Image.Transpose.TRANSPOSE), "PNG"), ERROR,
                 "extreme_aspect_ratio"),  # fmt: skip
        FuzzCase("1x60000.gif", encode(sliver.crop((0, 0, 1, 60_000)), "GIF"), ERROR, "extreme_aspect_ratio"),
        FuzzCase("1x150.png", encode(Image.new("RGB", (1, 150), (5, 90, 200)), "PNG"), EMBED),
        FuzzCase("150x1.webp", encode(Image.new("RGB", (150, 1), (5, 90, 200)), "WEBP"), EMBED),
        FuzzCase("big-3000x3000.png", encode(Image.new("1", (3000, 3000), 1), "PNG"), EMBED),
        # decompression bombs: tiny files whose headers claim billions of pixels
        FuzzCase("bomb-50000x50000.png", bomb_png(), ERROR, "decompression_bomb"),
        FuzzCase("bomb-screen.gif", patch_gif_screen(gif, 65535, 65535), ERROR, "decompression_bomb"),
        FuzzCase("bomb-100000x100000.tif", tiff_header_only(100_000, 100_000), ERROR, "decompression_bomb"),
        FuzzCase("bomb-sof.jpg", patch_jpeg_size(jpeg, 65500, 65500), ERROR, "decompression_bomb"),
        FuzzCase("bomb-16384.webp", patch_webp_lossless_size(encode(tiny, "WEBP", lossless=True),
                                                             16384, 16384), ERROR),  # fmt: skip
        FuzzCase("bomb-ztxt.png", ztxt_bomb_png(), ANY),
        # huge EXIF (~60 KB APP1, 200 KB eXIf) and orientation values outside 1..8
        *[FuzzCase(f"exif-huge-o{o}.jpg", encode(tiny, "JPEG", exif=exif_bytes(o, 60_000)), EMBED)
          for o in (0, 6, 9, 65535)],  # fmt: skip
        FuzzCase("exif-orientation-ascii.jpg", encode(tiny, "JPEG", exif=ascii_orientation_exif()), EMBED),
        FuzzCase("exif-huge.png", encode(tiny, "PNG", exif=exif_bytes(8, 200_000)), EMBED),
        FuzzCase("exif-huge.webp", encode(tiny, "WEBP", exif=exif_bytes(3, 100_000)), EMBED),
        FuzzCase("exif-garbage.jpg", _with_app1(jpeg, b"Exif\x00\x00" + bytes(range(256)) * 40), EMBED),
        # wrong extensions: the content decides
        FuzzCase("png-named.jpg", png, EMBED),
        FuzzCase("jpeg-named.png", jpeg, EMBED),
        FuzzCase("gif-named.webp", gif, EMBED),
        FuzzCase("webp-named.gif", webp, EMBED),
        FuzzCase("tiff-named.bmp", encode(tiny, "TIFF"), EMBED),
        FuzzCase("ico-named.png", encode(tiny, "ICO"), ERROR, "format_not_allowed"),
        FuzzCase("ppm-named.jpg", encode(tiny, "PPM"), ERROR, "format_not_allowed"),
        # empty and non-image files under image names
        *[FuzzCase(f"empty.{ext}", b"", ERROR, "empty") for ext in ("jpg", "png", "gif")],
        FuzzCase("text-named.jpg", b"definitely not a picture\n" * 20, ERROR, "not_an_image"),
        FuzzCase("zip-named.png", zip_bytes(), ERROR, "not_an_image"),
        FuzzCase("html-named.gif", b"<!doctype html><html><body><img src=x></body></html>", ERROR,
                 "not_an_image"),
        FuzzCase("svg-named.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', ERROR,
                 "not_an_image"),
        FuzzCase("pdf-named.tiff", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n%%EOF\n", ERROR,
                 "not_an_image"),
        FuzzCase("random-named.webp", bytes(random.Random(7).randbytes(4096)), ERROR, "not_an_image"),
        FuzzCase("nul-bytes.jpg", b"\x00" * 1000, ERROR, "not_an_image"),
        # magic bytes and nothing else
        *[FuzzCase(f"magic-only.{ext}", magic, ERROR)
          for ext, magic in [("jpg", b"\xff\xd8\xff"), ("png", b"\x89PNG\r\n\x1a\n"), ("gif", b"GIF89a"),
                             ("tif", b"II*\x00"), ("webp", b"RIFF\x00\x00\x00\x00WEBP"), ("bmp", b"BM")]],
        # skipped by the listing by design: other extensions, hidden names
        FuzzCase("notes.txt", b"not an input\n", UNLISTED),
        FuzzCase("archive.zip", zip_bytes(), UNLISTED),
        FuzzCase(".hidden.jpg", jpeg, UNLISTED),
        FuzzCase("no-extension", png, UNLISTED),
    ]  # fmt: skip
    # unusual names (valid images): spaces, unicode, URL- and glob-special characters, a newline
    names = ["dir with space/with space.jpg", "ünïcödé-画像.png", "emoji-😀.webp", "hash#1.jpg",
             "percent%20.png", "brackets[1].jpg", "star*.gif", "question?.png", "new\nline.jpg",
             "UPPER.JPEG", "double..png", "-dash.jpg", "file:colon.jpg", "deep/er/nest/ed.png"]  # fmt: skip
    cases += [FuzzCase(n, jpeg if n.lower().endswith((".jpg", ".jpeg")) else png if n.endswith(".png")
                       else gif if n.endswith(".gif") else webp, EMBED) for n in names]  # fmt: skip
    # "::" is fsspec's URL-chaining separator, read here as part of the name (storage.sources)
    cases.append(FuzzCase("double::colon.jpg", jpeg, EMBED))
    return cases


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


# --- mutations ----------------------------------------------------------------------------------------------

Mutation = Callable[[bytes, random.Random], bytes]


def _span(data: bytes, rng: random.Random, keep: int = 16) -> tuple[int, int]:
    start = rng.randrange(min(keep, len(data) - 1), len(data))
    return start, min(len(data), start + rng.randint(1, max(1, len(data) // 8)))


def bit_flips(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(min(16, len(out) - 1), len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite(data: bytes, rng: random.Random) -> bytes:
    a, b = _span(data, rng)
    return data[:a] + rng.randbytes(b - a) + data[b:]


def delete_span(data: bytes, rng: random.Random) -> bytes:
    a, b = _span(data, rng)
    return data[:a] + data[b:]


def duplicate_span(data: bytes, rng: random.Random) -> bytes:
    a, b = _span(data, rng)
    at = rng.randrange(a, len(data) + 1)
    return data[:at] + data[a:b] + data[at:]


def garbage_after_header(data: bytes, rng: random.Random) -> bytes:
    keep = min(len(data), rng.randint(16, 96))
    return data[:keep] + rng.randbytes(len(data) - keep)


def png_chunk_shuffle(data: bytes, rng: random.Random) -> bytes:
    """Drop, duplicate or swap whole chunks, or give IHDR new dimensions, all with valid CRCs."""
    chunks = png_chunks(data)
    op = rng.randrange(4)
    i, j = rng.randrange(len(chunks)), rng.randrange(len(chunks))
    if op == 0:
        del chunks[i]
    elif op == 1:
        chunks.insert(j, chunks[i])
    elif op == 2:
        chunks[i], chunks[j] = chunks[j], chunks[i]
    else:
        w, h = rng.choice([(0, 10), (1, 1), (4000, 4000), (2**31 - 1, 2), (40, 40000)])
        chunks[0] = (b"IHDR", struct.pack(">II", w, h) + chunks[0][1][8:])
    return png_from(chunks)


def header_field(data: bytes, rng: random.Random) -> bytes:
    """Random values in the first 64 bytes, where sizes, depths and offsets live."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(min(6, len(out) - 1), min(64, len(out)))
        out[pos] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF])
    return bytes(out)


MUTATIONS: tuple[Mutation, ...] = (bit_flips, overwrite, delete_span, duplicate_span, garbage_after_header,
                                   header_field)  # fmt: skip
TRUNCATE_AT = (7, 0.3, 0.7, -1)  # byte offsets (negative from the end) or fractions of the file


def truncate(data: bytes, at: float) -> bytes:
    n = int(len(data) * at) if isinstance(at, float) else (at if at > 0 else len(data) + at)
    return data[:n]


CORE = ("seed.jpg", "seed.png", "seed.gif", "seed.tif", "seed.webp", "seed.bmp")


def make_fuzz_corpus(seed: int = 0, mutants: int = 1, core_mutants: int = 2) -> list[FuzzCase]:
    """Every case of the corpus for SEED: seeds, special cases, truncations and mutants.

    MUTANTS per seed image, CORE_MUTANTS for the plain seed of each format.
    """
    rng = random.Random(seed)
    base = seeds()
    cases = [FuzzCase(name, data, EMBED) for name, data in base.items()]
    cases += special_cases()
    for name in CORE:
        stem, ext = name.rsplit(".", 1)
        cases += [FuzzCase(f"truncated/{stem}-at-{str(at).replace('.', '_')}.{ext}", truncate(base[name], at),
                           ANY) for at in TRUNCATE_AT]  # fmt: skip
    for name, data in base.items():
        stem, ext = name.rsplit(".", 1)
        ops = MUTATIONS + ((png_chunk_shuffle,) if ext == "png" else ())
        for k in range(core_mutants if name in CORE else mutants):
            op = rng.choice(ops)
            cases.append(FuzzCase(f"mutants/{stem}-{k}-{op.__name__}.{ext}", op(data, rng), ANY))
    return cases


def write_corpus(root: Path, cases: list[FuzzCase]) -> dict[str, FuzzCase]:
    """Write CASES under ROOT; returns uri (absolute path, as the listing reports it) -> case."""
    out = {}
    for case in cases:
        path = root / case.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(case.data)
        out[str(path)] = case
    return out
