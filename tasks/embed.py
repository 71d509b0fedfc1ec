"""The embedding actor: the encoder is loaded once in __init__ and stays resident on its device.

Ray Data's callable-class contract: `__init__` loads, `__call__(batch) -> batch`. The Ray batch is an
image count; inside it, images are packed into forwards by the token budget.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

import encoders
from encoders._base import default_batch_tokens
from tasks.decode import err_col, error_json, prep_col, timing_col
from tasks.faults import maybe_fault

log = logging.getLogger(__name__)


def emb_col(model: str) -> str:
    return f"emb__{model}"


def grid_col(model: str) -> str:
    return f"grid__{model}"


def tok_col(model: str) -> str:
    return f"tok__{model}"


class EmbedActor:
    def __init__(
        self,
        *,
        name: str,
        weights: str,
        revision: str,
        dtype: str | None = None,
        options: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        batch_tokens: int | None = None,
        patches: bool = True,
        patch_dtype: str = "fp16",
        threads: int | None = None,
        compile_blocks: bool = False,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.name = name
        self.encoder = encoders.load(
            name, weights, dtype=dtype, storage_options=storage_options or None, **(options or {})
        )
        if self.encoder.revision != revision:
            raise RuntimeError(
                f"{name}: weights changed during the run (planned revision {revision}, "
                f"loaded {self.encoder.revision}); re-run to plan against the new weights"
            )
        if compile_blocks:
            compile_fn = getattr(self.encoder, "compile_blocks", None)
            if compile_fn is None:
                raise ValueError(f"{name}: --compile is offered for the packed towers (Qwen, GLM) only")
            compile_fn()
        self.opts = self.encoder.options(patches=patches, patch_dtype=patch_dtype)
        _normal_priority()
        # None: the device's default (large on a GPU, cache-sized on a CPU; see default_batch_tokens)
        self.batch_tokens = default_batch_tokens(self.encoder.device, batch_tokens)
        self.pid = os.getpid()

    def _outputs(self, prepared: list[Any]) -> list[tuple]:
        result = self.encoder.embed_prepared(prepared, self.opts, batch_tokens=self.batch_tokens)
        return [
            (
                np.asarray(result.pooled[j], dtype=np.float32),
                list(result.grids[j]),
                np.ascontiguousarray(result.patches[j]).tobytes() if self.opts.patches else None,
            )
            for j in range(len(prepared))
        ]

    def _embed_resilient(self, prepared: list[Any]) -> list[tuple | str]:
        """Per image: its outputs, or an error row (JSON). Never raises for a bad batch.

        Out of memory halves the token budget and retries (the lower budget is kept for later
        batches); once every image is alone, or on any other failure, images go one by one so a
        single bad input costs only its own row.
        """
        while True:
            try:
                return self._outputs(prepared)
            except Exception as e:  # noqa: BLE001 - isolated below, never the run's end
                if not is_out_of_memory(e) or self.batch_tokens <= min(p.seq_len for p in prepared):
                    break
                _release_memory()
                self.batch_tokens = max(1, self.batch_tokens // 2)
        out: list[tuple | str] = []
        for p in prepared:
            try:
                out += self._outputs([p])
            except Exception as e:  # noqa: BLE001 - this image's error row
                _release_memory()
                out.append(error_json("embed", type(e).__name__, str(e)))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        maybe_fault("embed")  # test hook (tasks.faults): a no-op unless TOWERFLOW_FAULT names it
        prepared_col = batch[prep_col(self.name)].to_pylist()
        errors = batch[err_col(self.name)].to_pylist()
        rows = [i for i, p in enumerate(prepared_col) if p is not None]
        vectors: list[Any] = [None] * batch.num_rows
        grids: list[Any] = [None] * batch.num_rows
        tokens: list[Any] = [None] * batch.num_rows
        forward = [0.0] * batch.num_rows
        span = [time.time(), time.time()]
        if rows:
            prepared = [pickle.loads(prepared_col[i]) for i in rows]
            t0 = time.perf_counter()
            for i, out in zip(rows, self._embed_resilient(prepared), strict=True):
                if isinstance(out, str):
                    errors[i] = out
                else:
                    vectors[i], grids[i], tokens[i] = out
            span[1] = time.time()
            share = (time.perf_counter() - t0) / len(rows)
            for i in rows:
                forward[i] = share
        emb = _vector_column(vectors, self.encoder.dim)
        table = batch.drop_columns([prep_col(self.name), err_col(self.name)])
        table = table.append_column(err_col(self.name), pa.array(errors, pa.string()))
        table = table.append_column(emb_col(self.name), emb)
        table = table.append_column(grid_col(self.name), pa.array(grids, pa.list_(pa.int32())))
        table = table.append_column(tok_col(self.name), pa.array(tokens, pa.large_binary()))
        table = table.append_column(timing_col(f"forward__{self.name}"), pa.array(forward, pa.float64()))
        # when this actor was computing: the driver turns these into the steady-state span
        table = table.append_column(
            f"span_start__{self.name}", pa.array([span[0]] * batch.num_rows, pa.float64())
        )
        return table.append_column(
            f"span_end__{self.name}", pa.array([span[1]] * batch.num_rows, pa.float64())
        )


def _normal_priority() -> None:
    """Ray starts workers at niceness 15 (RAY_worker_niceness), below the driver, so the driver's
    scheduling loop and commits preempt the tower, which is the run's bottleneck. Bring every thread of
    this actor back to 0 where allowed (root, CAP_SYS_NICE); otherwise say how to fix it."""
    if not hasattr(os, "setpriority") or os.getpriority(os.PRIO_PROCESS, 0) <= 0:
        return
    try:
        for tid in os.listdir("/proc/self/task"):  # Linux: niceness is per thread
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except (OSError, ValueError) as e:
        log.warning("the embedding actor stays at niceness %d (%s); start Ray with RAY_worker_niceness=0 so "
                    "the driver and decode tasks do not preempt it", os.getpriority(os.PRIO_PROCESS, 0), e)


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _vector_column(vectors: list[np.ndarray | None], dim: int) -> pa.Array:
    """fixed_size_list<float32>[dim], null where the input failed."""
    values = np.zeros((len(vectors), dim), dtype=np.float32)
    missing = np.ones(len(vectors), dtype=bool)
    for i, v in enumerate(vectors):
        if v is not None:
            values[i], missing[i] = v, False
    mask = pa.array(missing) if missing.any() else None
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=mask)
