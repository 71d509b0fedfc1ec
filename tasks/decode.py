"""Read + decode + preprocess, in Ray Data CPU tasks: bytes -> sha256 -> RGB -> each model's inputs.

Never raises for one bad input: a failure becomes error columns on its row (Ray Data drops rows of
failed blocks, so an exception here would lose the whole batch).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import time
from typing import Any

import pyarrow as pa

import encoders
from storage.images import (
    DEFAULT_DECODE_SECONDS,
    DecodeConfig,
    ImageDecodeError,
    decode_image_limited,
    original_size,
)
from storage.lake import is_access_denied
from storage.sources import read_bytes

DECODE_NICE = 5  # niceness of decode threads above their worker's (see _lower_priority)

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


def _read(uri: str, source_options: dict, clock: dict[str, float]) -> tuple[bytes | None, str | None]:
    t0 = time.perf_counter()
    try:
        return read_bytes(uri, source_options), None
    except Exception as e:  # noqa: BLE001 - any other read failure is this input's error row
        if is_access_denied(e):  # the run's credentials, not this file: fail the run fast, in one line
            raise
        return None, error_json("read", type(e).__name__, str(e))
    finally:
        clock["read"] += time.perf_counter() - t0


def _decode(data: bytes, uri: str, config: DecodeConfig, clock: dict[str, float]) -> tuple[Any, str | None]:
    """(image, error_json): exactly one is set. Adds to CLOCK."""
    t0 = time.perf_counter()
    try:
        return decode_image_limited(data, config, name=uri), None
    except ImageDecodeError as e:
        return None, error_json("decode", e.reason, e.message)
    finally:
        clock["decode"] += time.perf_counter() - t0


def _lower_priority() -> None:
    """Decode threads yield the CPU to the embedding actors on the node: the tower is what must never
    wait. os.nice raises this thread's niceness relative to the worker's (Linux: per thread; the
    decode threads it starts inherit it), never the worker's main thread, which Ray may later reuse
    for an actor. TOWERFLOW_DECODE_NICE tunes the increment (0: off)."""
    increment = int(os.environ.get("TOWERFLOW_DECODE_NICE", DECODE_NICE))
    if increment and hasattr(os, "nice"):
        os.nice(increment)  # raising one's own niceness needs no privilege


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _low_priority_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="towerflow-decode-batch", initializer=_lower_priority
        )
    return _pool


def decode_batch(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """The Ray task: runs _decode_batch (same arguments) in a lower-priority thread."""
    return _low_priority_pool().submit(_decode_batch, batch, **kwargs).result()


def _decode_batch(
    batch: pa.Table,
    *,
    models: list[dict[str, Any]],
    source_options: dict | None = None,
    max_image_pixels: int | None = None,
    decode_timeout_s: float | None = DEFAULT_DECODE_SECONDS,
) -> pa.Table:
    """models: [{"name", "weights", "options", "storage_options"}] of the run, in order.

    decode_timeout_s: per-image wall-clock limit of the decode (None: none); a file that takes longer
    becomes a decode/timeout error row. Each model decodes with its own DecodeConfig (e.g. DINOv2's
    draft scale); models that share one share the decode.
    """
    source_options = source_options or {}
    limits = {"max_pixels": max_image_pixels} if max_image_pixels else {}
    pres = {
        m["name"]: _preprocessor(
            m["name"],
            m["weights"],
            json.dumps(m.get("options", {}), sort_keys=True),
            json.dumps(m.get("storage_options", {}), sort_keys=True),
        )  # fmt: skip
        for m in models
    }
    configs = {
        name: dataclasses.replace(pre.decode_config(), timeout_s=decode_timeout_s, **limits)
        for name, pre in pres.items()
    }
    rows = batch.to_pylist()
    out: dict[str, list[Any]] = {k: [] for k in ("image_id", "width", "height", "error")}
    for name in pres:
        out[prep_col(name)], out[err_col(name)] = [], []
    timings: dict[str, list[float]] = {"read": [], "decode": [], "preprocess": []}
    for row in rows:
        clock = dict.fromkeys(timings, 0.0)
        wanted = [n for n in pres if n in (row["models"] or ())]
        data, error = _read(row["uri"], source_options, clock)
        decoded: dict[DecodeConfig, tuple[Any, str | None]] = {}
        decode_for = wanted or list(pres)[:1]  # the row's metadata even if no model wants it
        if data is not None:
            for name in decode_for:
                if configs[name] not in decoded:
                    decoded[configs[name]] = _decode(data, row["uri"], configs[name], clock)
        first = decoded[configs[decode_for[0]]] if decoded else (None, error)
        image, error = first
        size = original_size(image) if image is not None else (None, None)
        out["image_id"].append(hashlib.sha256(data).hexdigest() if data is not None else None)
        out["width"].append(size[0])
        out["height"].append(size[1])
        out["error"].append(error)
        for name, pre in pres.items():
            prepared, perr = None, None
            img, derr = decoded.get(configs[name], (None, None))
            if error is None and name in wanted:
                if img is None:  # this model's decode failed where the first model's did not
                    perr = derr
                else:
                    t0 = time.perf_counter()
                    try:
                        prepared = pickle.dumps(pre.preprocess_image(img), protocol=5)
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
