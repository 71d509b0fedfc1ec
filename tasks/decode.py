"""Read + decode + preprocess, in Ray Data CPU tasks: bytes -> sha256 -> RGB -> each model's inputs.

Never raises for one bad input: a failure becomes error columns on its row (Ray Data drops rows of
failed blocks, so an exception here would lose the whole batch).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import time
from typing import Any

import pyarrow as pa

import encoders
from storage.images import DEFAULT_DECODE_SECONDS, DecodeConfig, ImageDecodeError, decode_image_limited
from storage.sources import read_bytes

INPUT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("size_bytes", pa.int64()),
        ("source_version", pa.string()),
        ("models", pa.list_(pa.string())),
    ]
)


def prep_col(model: str) -> str:
    return f"prep__{model}"


def err_col(model: str) -> str:
    return f"err__{model}"


def error_json(stage: str, error_type: str, message: str) -> str:
    """An error row's payload; never without a reason, even for exceptions raised without a message."""
    message = (message or "").strip() or f"{error_type} raised without a message"
    return json.dumps({"stage": stage, "type": error_type or "Exception", "message": message[:2000]})


@functools.lru_cache(maxsize=16)
def _preprocessor(name: str, weights: str, options_json: str, storage_json: str) -> encoders.Encoder:
    """One per worker process and model: processors are cheap, but not free to rebuild per batch."""
    options, storage = json.loads(options_json), json.loads(storage_json)
    return encoders.load_preprocessor(name, weights, storage_options=storage or None, **options)


def timing_col(stage: str) -> str:
    """Per-row seconds spent in STAGE; they travel with the rows so the driver can total them."""
    return f"t__{stage}"


def _read_decode(
    uri: str, source_options: dict, config: DecodeConfig, clock: dict[str, float]
) -> tuple[Any, str | None, str | None]:
    """(image, image_id, error_json): exactly one of image / error is set. Adds to CLOCK."""
    t0 = time.perf_counter()
    try:
        data = read_bytes(uri, source_options)
    except Exception as e:  # noqa: BLE001 - any read failure is this input's error row, never the run's
        return None, None, error_json("read", type(e).__name__, str(e))
    finally:
        clock["read"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        image_id = hashlib.sha256(data).hexdigest()
        return decode_image_limited(data, config, name=uri), image_id, None
    except ImageDecodeError as e:
        return None, image_id, error_json("decode", e.reason, e.message)
    finally:
        clock["decode"] += time.perf_counter() - t0


def decode_batch(
    batch: pa.Table,
    *,
    models: list[dict[str, Any]],
    source_options: dict | None = None,
    max_image_pixels: int | None = None,
    decode_timeout_s: float | None = DEFAULT_DECODE_SECONDS,
) -> pa.Table:
    """models: [{"name", "weights", "options", "storage_options"}] of the run, in order.

    decode_timeout_s: per-image wall-clock limit of the decode (None: none); a file that takes longer
    becomes a decode/timeout error row.
    """
    source_options = source_options or {}
    limits = {"max_pixels": max_image_pixels} if max_image_pixels else {}
    config = DecodeConfig(timeout_s=decode_timeout_s, **limits)
    pres = {
        m["name"]: _preprocessor(
            m["name"],
            m["weights"],
            json.dumps(m.get("options", {}), sort_keys=True),
            json.dumps(m.get("storage_options", {}), sort_keys=True),
        )  # fmt: skip
        for m in models
    }
    rows = batch.to_pylist()
    out: dict[str, list[Any]] = {k: [] for k in ("image_id", "width", "height", "error")}
    for name in pres:
        out[prep_col(name)], out[err_col(name)] = [], []
    timings: dict[str, list[float]] = {"read": [], "decode": [], "preprocess": []}
    for row in rows:
        clock = dict.fromkeys(timings, 0.0)
        image, image_id, error = _read_decode(row["uri"], source_options, config, clock)
        out["image_id"].append(image_id)
        out["width"].append(image.width if image else None)
        out["height"].append(image.height if image else None)
        out["error"].append(error)
        for name, pre in pres.items():
            prepared, perr = None, None
            if image is not None and name in (row["models"] or ()):
                t0 = time.perf_counter()
                try:
                    prepared = pickle.dumps(pre.preprocess_image(image), protocol=5)
                except Exception as e:  # noqa: BLE001 - e.g. an aspect ratio the model refuses
                    perr = error_json("decode", type(e).__name__, str(e))
                clock["preprocess"] += time.perf_counter() - t0
            out[prep_col(name)].append(prepared)
            out[err_col(name)].append(perr)
        for stage, seconds in clock.items():
            timings[stage].append(seconds)
    table = batch.select(["uri", "size_bytes", "source_version", "models"])
    types = {"image_id": pa.string(), "width": pa.int32(), "height": pa.int32(), "error": pa.string()}
    for col, values in out.items():
        typ = types.get(col, pa.large_binary() if col.startswith("prep__") else pa.string())
        table = table.append_column(col, pa.array(values, type=typ))
    for stage, values in timings.items():
        table = table.append_column(timing_col(stage), pa.array(values, pa.float64()))
    return table
