"""The embedding actor under memory pressure: a batch that does not fit is split, not lost."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from _support import smooth_image

import encoders
from encoders._base import CPU_BATCH_TOKENS
from tasks.decode import INPUT_SCHEMA, decode_batch
from tasks.embed import EmbedActor, emb_col


@pytest.fixture
def rows(tmp_path, checkpoint):
    paths = []
    for i, (h, w) in enumerate([(120, 200), (300, 90), (64, 64), (200, 200), (90, 160), (140, 140)]):
        paths.append(tmp_path / f"{i}.png")
        smooth_image(h, w, i).save(paths[-1])
    table = pa.Table.from_pylist(
        [{"uri": str(p), "size_bytes": p.stat().st_size, "source_version": "v", "models": ["qwen2_5_vl"]}
         for p in paths],
        schema=INPUT_SCHEMA,
    )  # fmt: skip
    models = [{"name": "qwen2_5_vl", "weights": str(checkpoint("qwen2_5_vl"))}]
    return decode_batch(table, models=models), paths


def actor(checkpoint, budget):
    enc = encoders.load("qwen2_5_vl", checkpoint("qwen2_5_vl"))
    return EmbedActor(name="qwen2_5_vl", weights=str(checkpoint("qwen2_5_vl")), revision=enc.revision,
                      batch_tokens=budget)  # fmt: skip


def test_the_actors_default_budget_is_its_devices(checkpoint):
    assert actor(checkpoint, None).batch_tokens == CPU_BATCH_TOKENS  # the tests run on the CPU
    assert actor(checkpoint, 300).batch_tokens == 300


def fail_above(a: EmbedActor, limit: int, calls: list[int]):
    """Simulated accelerator memory: a packed forward of more than LIMIT tokens runs out of memory."""
    real = a.encoder.forward

    def forward(batch, opts):
        tokens = sum(p.seq_len for p in batch)
        calls.append(tokens)
        if tokens > limit:
            raise torch.OutOfMemoryError(f"simulated: {tokens} tokens > {limit}")
        return real(batch, opts)

    a.encoder.forward = forward


def test_out_of_memory_splits_the_batch_and_loses_nothing(rows, checkpoint):
    table, paths = rows
    calm = actor(checkpoint, 1 << 20)(table)
    squeezed = actor(checkpoint, 1 << 20)
    calls: list[int] = []
    fail_above(squeezed, limit=300, calls=calls)
    out = squeezed(table)
    assert out[emb_col("qwen2_5_vl")].null_count == 0
    assert out["err__qwen2_5_vl"].null_count == len(paths)
    np.testing.assert_allclose(
        np.array(out[emb_col("qwen2_5_vl")].to_pylist()),
        np.array(calm[emb_col("qwen2_5_vl")].to_pylist()),
        atol=1e-5,
    )
    assert max(calls) > 300 and squeezed.batch_tokens <= 300  # it did run out, then packed less
    assert calls[-1] <= 300 and len(calls) > len(paths) // 2


def test_an_image_too_big_even_alone_is_its_own_error_row(rows, checkpoint):
    table, paths = rows
    a = actor(checkpoint, 1 << 20)
    seq = [pickle.loads(s).seq_len for s in table["prep__qwen2_5_vl"].to_pylist()]
    fail_above(a, limit=max(seq) - 1, calls=[])
    out = a(table)
    errors = out["err__qwen2_5_vl"].to_pylist()
    biggest = seq.index(max(seq))
    assert [e is not None for e in errors] == [i == biggest for i in range(len(paths))]
    assert '"stage": "embed"' in errors[biggest] and "OutOfMemoryError" in errors[biggest]
    assert out[emb_col("qwen2_5_vl")].null_count == 1


@pytest.mark.slow
def test_an_actor_with_compiled_blocks_gives_the_same_vectors(rows, checkpoint):
    table, _ = rows
    enc = encoders.load("qwen2_5_vl", checkpoint("qwen2_5_vl"))
    compiled = EmbedActor(name="qwen2_5_vl", weights=str(checkpoint("qwen2_5_vl")), revision=enc.revision,
                          compile_blocks=True)  # fmt: skip
    plain = actor(checkpoint, 16384)(table)[emb_col("qwen2_5_vl")].to_numpy(zero_copy_only=False)
    got = compiled(table)[emb_col("qwen2_5_vl")].to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(np.stack(got), np.stack(plain), atol=1e-4)
