"""Hardened Pillow decoding for untrusted image files.

Every input a user or a crawled corpus hands us is treated as hostile: the pixel count is checked from
the header before any pixels are allocated, truncated files are rejected rather than padded with grey,
only an allow-list of formats is parsed, and every Pillow failure becomes an `ImageDecodeError` with a
short machine-readable reason, so the decode stage can emit one error row per bad image and carry on.
Pillow's process-wide settings (`Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES`) are never
modified: other code in the same worker may rely on them.
"""

from __future__ import annotations

import concurrent.futures
import errno
import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from storage.sources import read_bytes

DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"})
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default bomb limit (its error; it warns at half)

REASONS = frozenset(
    {
        "not_an_image",
        "format_not_allowed",
        "truncated",
        "decompression_bomb",
        "corrupt",
        "empty",
        "read_failed",
        "timeout",
        "extreme_aspect_ratio",
        "out_of_memory",
    }
)
# the file may decode on another attempt (a busy or memory-starved worker): later runs retry these
TRANSIENT_REASONS = frozenset({"timeout", "out_of_memory"})
DEFAULT_DECODE_SECONDS = 30.0
# Qwen2.5-VL, Qwen3-VL and GLM-4V refuse more than 200:1; DINOv2's shortest-edge resize would inflate a
# 1 x 100,000 sliver to 256 x 25.6M pixels (~20 GB) and take the worker down with it.
DEFAULT_MAX_ASPECT_RATIO = 200.0

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_TRUNCATED_HINTS = ("truncated", "broken data stream")


class ImageDecodeError(ValueError):
    """A file that could not be turned into an image; `reason` (one of REASONS) is what error rows store."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Ray ships exceptions between processes; the default pickling would re-call __init__ with one arg.
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True)
class DecodeConfig:
    """Limits for decoding. Pillow's hard limit (2 x Image.MAX_IMAGE_PIXELS) still applies on top."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    formats: frozenset[str] = DEFAULT_FORMATS
    timeout_s: float | None = DEFAULT_DECODE_SECONDS  # per image, in decode_image_limited
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO  # long side / short side; None: no limit
    # JPEG only: decode at the smallest DCT scale (1/2, 1/4, 1/8) whose short side is still >= this.
    # Encoders that resize to a fixed short side set it: a 4000x3000 photo bound for 256 px decodes
    # ~8x faster, and the resize that follows sees the same scene (as Pillow's thumbnail() does).
    draft_short_side: int | None = None

    def __post_init__(self):
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be a positive int, got {self.max_pixels!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive or None, got {self.timeout_s!r}")
        if self.max_aspect_ratio is not None and not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio must be >= 1 or None, got {self.max_aspect_ratio!r}")
        if isinstance(self.formats, str):
            raise TypeError("formats must be a collection of Pillow format names, not a single string")
        object.__setattr__(self, "formats", frozenset(f.upper() for f in self.formats))


ORIGINAL_SIZE = "towerflow_original_size"  # Image.info key: (width, height) upright, when decoded smaller


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the file an image was decoded from, upright (a draft decode is smaller)."""
    return tuple(image.info.get(ORIGINAL_SIZE, image.size))


_decoder: concurrent.futures.ThreadPoolExecutor | None = None


def decode_image_limited(
    data: bytes, config: DecodeConfig = DecodeConfig(), *, name: str = "<bytes>"
) -> Image.Image:
    """decode_image under a wall-clock limit: a pathological file becomes a "timeout" error, not a hang.

    Python cannot stop the stuck thread; it is abandoned (a fresh one serves the next image) and ends
    on its own, bounded by the pixel limit.
    """
    global _decoder
    if config.timeout_s is None:
        return decode_image(data, config, name=name)
    if _decoder is None:
        _decoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="towerflow-decode")
    future = _decoder.submit(decode_image, data, config, name=name)
    try:
        return future.result(timeout=config.timeout_s)
    except concurrent.futures.TimeoutError:
        _decoder.shutdown(wait=False)
        _decoder = None
        raise ImageDecodeError(
            "timeout", f"{name}: decoding took longer than {config.timeout_s:g} s"
        ) from None


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig(), *, name: str = "<bytes>") -> Image.Image:
    """bytes -> RGB image, fully loaded, EXIF-rotated and detached from `data`.

    Raises ImageDecodeError for anything wrong with the file (never a raw Pillow exception), so callers
    need one except clause. `name` only labels messages.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if memoryview(data).nbytes == 0:
        raise ImageDecodeError("empty", f"{name}: file is empty")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Pillow reads this global at load time; with it on, truncated files decode as grey-padded images.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; refusing to decode untrusted images"
        )
    with warnings.catch_warnings():
        # Pillow's bomb warning becomes an exception here (the global MAX_IMAGE_PIXELS is left alone).
        # catch_warnings is process-wide, not per thread (before 3.14); the header check below does not
        # depend on it, so concurrent threads can at worst let a bomb warning be logged, not an image through.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = None
        try:
            try:
                img = _open(data, config, name)
            except Image.DecompressionBombWarning:
                # Pillow warns above MAX_IMAGE_PIXELS (89.5M by default), only half its hard limit and
                # DEFAULT_MAX_PIXELS; config.max_pixels decides instead, from the header, just below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = _open(data, config, name)
            width, height = img.size  # header only: Image.open is lazy, no pixels allocated yet
            if width * height > config.max_pixels:
                msg = f"{name}: {width}x{height} is over max_pixels={config.max_pixels}"
                raise ImageDecodeError("decompression_bomb", msg)
            if width <= 0 or height <= 0:
                raise ImageDecodeError("corrupt", f"{name}: invalid size {width}x{height}")
            _check_aspect(width, height, config, name)
            img.seek(0)  # animated GIF / WebP / APNG: first frame only
            if config.draft_short_side and img.format == "JPEG":
                scale = config.draft_short_side / min(width, height)
                img.draft(img.mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
            img.load()
            rgb = to_rgb(img)
            if img.size != (width, height):  # decoded smaller: sizes reported to users stay the file's own
                rgb.info[ORIGINAL_SIZE] = (width, height) if rgb.size == img.size else (height, width)
            return rgb
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError("decompression_bomb", f"{name}: {e}") from e
        except MemoryError as e:  # the worker's memory, not necessarily the file: not a permanent verdict
            raise ImageDecodeError("out_of_memory", f"{name}: out of memory while decoding") from e
        except Exception as e:  # untrusted input: any Pillow failure is a per-file error
            raise _classify(e, name) from e
        finally:
            if img is not None:
                img.close()


def _check_aspect(width: int, height: int, config: DecodeConfig, name: str) -> None:
    """From the header, like the pixel limit: a degenerate sliver is refused before any pixel exists."""
    limit = config.max_aspect_ratio
    if limit is not None and max(width, height) > limit * min(width, height):
        msg = f"{name}: {width}x{height} is more elongated than {limit:g}:1 (max_aspect_ratio)"
        raise ImageDecodeError("extreme_aspect_ratio", msg)


def _open(data, config: DecodeConfig, name: str) -> Image.Image:
    """Image.open restricted to the allowed formats; explains an unidentified file as well as it can."""
    try:
        return Image.open(io.BytesIO(data), formats=sorted(config.formats))
    except UnidentifiedImageError:
        pass
    # Find out why, for a better error row. Header parsing only: Image.open never decodes pixels.
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception:  # any failure here just means "not a recognisable image"
        fmt = None
    if fmt is not None:
        msg = f"{name}: format {fmt} is not in the allowed formats {sorted(config.formats)}"
        raise ImageDecodeError("format_not_allowed", msg)
    looks_like = _sniff(bytes(memoryview(data)[:16]), config.formats)
    if looks_like:
        msg = f"{name}: starts like a {looks_like} file but its header is unreadable"
        raise ImageDecodeError("corrupt", msg)
    raise ImageDecodeError("not_an_image", f"{name}: not a recognisable image file")


def _sniff(prefix: bytes, formats: frozenset[str]) -> str | None:
    """The allowed format whose magic bytes match, if any (Pillow's own per-plugin `accept` checks)."""
    Image.init()
    for fmt in sorted(formats):
        accept = Image.OPEN.get(fmt, (None, None))[1]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # a plugin's sniffer failing just means "no match"
            continue
    return None


def _classify(e: Exception, name: str) -> ImageDecodeError:
    msg = str(e)
    if isinstance(e, (OSError, EOFError)) and any(h in msg.lower() for h in _TRUNCATED_HINTS):
        return ImageDecodeError("truncated", f"{name}: {msg}")
    return ImageDecodeError("corrupt", f"{name}: {type(e).__name__}: {msg}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> a new RGB image: EXIF orientation applied, alpha composited on white, wide ints scaled.

    Pillow's own convert("RGB") clips 16-bit and float data instead of scaling it (65535 and 300 both
    become 255), and drops alpha onto black; both would silently skew embeddings.
    """
    out = _exif_transpose(img)
    mode = out.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(out)).convert("RGB")
    if mode == "La":
        out = out.convert("LA")  # Pillow has no La -> RGBA path
    if mode in _ALPHA_MODES or "transparency" in out.info:
        rgba = out.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return out if mode == "RGB" else out.convert("RGB")  # exif_transpose already returned a copy


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Upright copy of `img`; a broken EXIF block leaves the pixels as stored rather than losing the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF in untrusted files is common and harmless to ignore
        img.load()
        return img.copy()


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """I;16* -> value/257; I within 0..65535 -> 16-bit likewise; F within 0..1 -> x255; else min..max."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = a * 255.0
    elif img.mode != "F" and lo >= 0 and hi <= 65535:
        scaled = a / 257.0
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_image(
    obj, config: DecodeConfig = DecodeConfig(), *, storage_options: dict | None = None
) -> Image.Image:
    """Any user input -> RGB image: a local path or fsspec URL, encoded bytes, a PIL image or a uint8 array.

    Files and bytes go through decode_image (all guards apply); PIL images and arrays are already in
    memory, so only the conversion to RGB and the aspect-ratio limit (a sliver would blow up in a
    shortest-edge resize) apply.
    """
    if isinstance(obj, (Image.Image, np.ndarray)):
        img = to_rgb(obj) if isinstance(obj, Image.Image) else _from_array(obj)
        _check_aspect(img.width, img.height, config, f"<{type(obj).__name__}>")
        return img
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return decode_image(obj, config)
    if isinstance(obj, (str, os.PathLike)):
        return decode_image(_read(obj, storage_options), config, name=str(obj))
    raise TypeError(
        f"load_image cannot read {type(obj).__name__}: expected a path or URL (str / os.PathLike), bytes, "
        "a PIL.Image.Image or a uint8 numpy array"
    )


def _read(path, storage_options: dict | None) -> bytes:
    try:
        return read_bytes(os.fspath(path), storage_options)
    except FileNotFoundError as e:
        # name what the caller passed, as an image
        raise FileNotFoundError(errno.ENOENT, "No such image file", str(path)) from e
    except Exception as e:  # permissions, directories, network: the file could not be read
        raise ImageDecodeError("read_failed", f"{path}: {type(e).__name__}: {e}") from e


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise TypeError(f"load_image expects a uint8 array, got dtype {arr.dtype}; scale it to 0..255 first")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or 0 in arr.shape:
        raise ValueError(f"load_image expects an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))  # L, RGB or RGBA from the shape
