"""Hostile inputs through the whole embed flow: no crash, no hang, every input accounted for exactly once.

One run of `embed_corpus` (local Ray, Prefect's test harness, tiny checkpoints) embeds the fuzz corpus of
tests/_fuzz.py with two models at once: qwen2_5_vl (dynamic resolution: extreme aspect ratios reach its
smart resize) and dinov2 (fixed crop after a shortest-edge resize). The lake is then read back with
DuckDB: per model, embedded uris and error uris partition the listed inputs.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from _fuzz import ANY, EMBED, ERROR, UNLISTED, FuzzCase, encode, make_fuzz_corpus, write_corpus
from PIL import Image

from flows.embed import embed_corpus
from storage.images import DecodeConfig, ImageDecodeError, decode_image
from storage.schema import ERROR_STAGES
from storage.sources import SourceItem, list_source
from storage.vectors import VectorTable
from tasks.decode import INPUT_SCHEMA, decode_batch, err_col, error_json, prep_col

MODELS = ("qwen2_5_vl", "dinov2")
# The whole run on 2 shared cores takes ~1-2 min; a hang (a decode without a time limit, a deadlocked
# pool) must fail the test long before CI's own limit, not freeze it.
DEADLINE_S = 420


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory, checkpoint, ray_local, prefect_harness):
    """(uri -> case, summary, lake, seconds): the corpus embedded once for every test of this module."""
    root = tmp_path_factory.mktemp("fuzz")
    cases = write_corpus(root / "corpus", make_fuzz_corpus(seed=0))
    refuse_slivers_first(cases)
    lake = root / "lake"
    weights = ",".join(f"{m}={checkpoint(m)}" for m in MODELS)
    start = time.perf_counter()
    summary = call_with_deadline(
        lambda: embed_corpus(source=str(root / "corpus"), out=str(lake), model=",".join(MODELS),
                             weights=weights, actors=1, batch_images=16, quiet=True),
        DEADLINE_S,
    )  # fmt: skip
    return cases, summary, lake, time.perf_counter() - start


def refuse_slivers_first(cases: dict[str, FuzzCase]) -> None:
    """Without the aspect-ratio limit, DINOv2's resize of a 1 x 100,000 sliver allocates ~20 GB: the OOM
    killer, not an assertion, would end the run (and maybe a neighbour). Fail cleanly before that."""
    for case in cases.values():
        if case.reason == "extreme_aspect_ratio":
            with pytest.raises(ImageDecodeError, match="extreme_aspect_ratio"):
                decode_image(case.data, name=case.name)


def call_with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """FN's result; fails the test if FN has not returned after SECONDS (its thread is abandoned)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's own thread below
            box["error"] = e

    thread = threading.Thread(target=target, name="fuzz-embed-flow", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the embed flow did not return within {seconds} s on the fuzz corpus (a hang)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def duck(lake: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(f"SET extension_directory = '{lake.parent / 'duckdb-ext'}'")
    return con


def lake_rows(lake: Path, kind: str, columns: str) -> list[tuple]:
    return (
        duck(lake)
        .execute(f"SELECT {columns} FROM read_parquet('{lake}/{kind}/**/*.parquet', hive_partitioning=true)")
        .fetchall()
    )


def model_glob(lake: Path, model: str) -> str:
    return f"read_parquet('{lake}/embeddings/model={model}/**/*.parquet')"


def listed(cases: dict[str, FuzzCase]) -> set[str]:
    return {uri for uri, c in cases.items() if c.expect != UNLISTED}


def outcomes(lake: Path, model: str) -> tuple[list[str], list[str]]:
    """(embedded uris, error uris) for MODEL: its own errors plus model-independent ones; duplicates kept."""
    embedded = [u for (u,) in duck(lake).execute(f"SELECT uri FROM {model_glob(lake, model)}").fetchall()]
    errors = [u for u, m in lake_rows(lake, "errors", "uri, model") if m is None or m == model]
    return embedded, errors


def repeated(values: list[str]) -> list[str]:
    return [v for v, n in collections.Counter(values).items() if n > 1]


@pytest.mark.slow
def test_flow_returns_and_counts_every_input(fuzz_run):
    cases, summary, _, seconds = fuzz_run
    inputs = listed(cases)
    assert 80 <= len(inputs) <= 150
    c = summary["counts"]
    assert summary["status"] == "succeeded"
    assert (c["listed"], c["planned"], c["skipped_done"]) == (len(inputs), len(inputs), 0)
    assert c["list_errors"] == 0
    assert c["embedded"] + c["errors"] == len(inputs) and c["missing"] == 0
    assert seconds < DEADLINE_S


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_each_model_embeds_or_errors_every_input_exactly_once(fuzz_run, model):
    cases, _, lake, _ = fuzz_run
    embedded, errors = outcomes(lake, model)
    assert repeated(embedded) == [] and repeated(errors) == []
    assert set(embedded) & set(errors) == set()
    assert set(embedded) | set(errors) == listed(cases)


@pytest.mark.slow
def test_every_error_row_has_a_reason(fuzz_run):
    _, summary, lake, _ = fuzz_run
    rows = lake_rows(lake, "errors", "uri, model, stage, error_type, message")
    assert rows
    for uri, model, stage, error_type, message in rows:
        assert stage in ERROR_STAGES, (uri, stage)
        assert error_type and error_type.strip(), uri
        assert message and message.strip(), uri
        assert model in (None, *MODELS), uri
    assert sum(summary["errors_by_reason"].values()) == len(rows)


@pytest.mark.slow
def test_valid_files_are_embedded_and_hostile_ones_refused_for_their_reason(fuzz_run):
    cases, _, lake, _ = fuzz_run
    for model in MODELS:
        embedded, _ = outcomes(lake, model)
        missing = sorted(c.name for uri, c in cases.items() if c.expect == EMBED and uri not in embedded)
        assert missing == [], model
    decode_errors = {u: t for u, m, s, t in lake_rows(lake, "errors", "uri, model, stage, error_type")
                     if m is None and s == "decode"}  # fmt: skip
    refused = {uri: c for uri, c in cases.items() if c.expect == ERROR}
    assert sorted(cases[u].name for u in refused if u not in decode_errors) == []
    wrong = {c.name: (c.reason, decode_errors[u]) for u, c in refused.items()
             if c.reason and decode_errors[u] != c.reason}  # fmt: skip
    assert wrong == {}
    unlisted = {uri for uri, c in cases.items() if c.expect == UNLISTED}
    assert unlisted & {u for (u,) in lake_rows(lake, "embeddings", "uri")} == set()
    assert unlisted & set(decode_errors) == set()
    assert sum(c.expect == ANY for c in cases.values()) >= 40  # the mutants really went through


@pytest.mark.slow
def test_no_decode_reached_the_time_limit(fuzz_run):
    _, summary, lake, _ = fuzz_run
    types = {t for (t,) in lake_rows(lake, "errors", "error_type")}
    assert "timeout" not in types
    # worker seconds spent decoding, summed over every input: each single decode took less than this
    assert summary["timings"]["stage.decode"] < DecodeConfig().timeout_s


@pytest.mark.slow
def test_vector_tables_hold_what_parquet_holds(fuzz_run):
    _, _, lake, _ = fuzz_run
    for model in MODELS:
        rows = (
            duck(lake).execute(f"SELECT image_id, len(embedding) FROM {model_glob(lake, model)}").fetchall()
        )
        table = VectorTable.open(str(lake), model, rows[0][1])
        lance_ids = table.table.to_arrow()["image_id"].to_pylist()
        assert len(lance_ids) == len(set(lance_ids)) and set(lance_ids) == {i for i, _ in rows}, model


# --- fast: the corpus itself, and the decode task on it without Ray ----------------------------------------


def test_corpus_is_deterministic_small_and_quick():
    start = time.perf_counter()
    first = make_fuzz_corpus(seed=0)
    assert time.perf_counter() - start < 10
    assert [(c.name, c.data) for c in make_fuzz_corpus(seed=0)] == [(c.name, c.data) for c in first]
    other = {c.name: c.data for c in make_fuzz_corpus(seed=1)}
    assert any(other.get(c.name) != c.data for c in first if c.name.startswith("mutants/"))
    assert len({c.name for c in first}) == len(first) and sum(len(c.data) for c in first) < 2_000_000
    kinds = collections.Counter(c.expect for c in first)
    assert kinds[EMBED] >= 40 and kinds[ERROR] >= 20 and kinds[ANY] >= 40 and kinds[UNLISTED] >= 3


def test_listing_sees_exactly_the_listed_cases(tmp_path):
    cases = write_corpus(tmp_path, make_fuzz_corpus(seed=0))
    items = list(list_source(tmp_path))
    assert all(isinstance(i, SourceItem) for i in items)
    assert sorted(i.uri for i in items) == sorted(listed(cases))


@pytest.mark.filterwarnings("ignore:Tag data larger than file:UserWarning")  # Pillow, on a TIFF mutant
def test_decode_task_gives_every_fuzz_file_one_row_with_an_outcome(tmp_path, checkpoint):
    """decode_batch in-process (no Ray): per input, each model's inputs or an error with a reason."""
    cases = write_corpus(tmp_path, make_fuzz_corpus(seed=0))
    refuse_slivers_first(cases)
    uris = sorted(listed(cases))
    models = [{"name": m, "weights": str(checkpoint(m))} for m in MODELS]
    rows = [{"uri": u, "size_bytes": len(cases[u].data), "source_version": "v", "models": list(MODELS)}
            for u in uris]  # fmt: skip
    out = decode_batch(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), models=models).to_pylist()
    assert [r["uri"] for r in out] == uris
    for row in out:
        case = cases[row["uri"]]
        errors = [json.loads(e) for e in [row["error"], *(row[err_col(m)] for m in MODELS)] if e]
        assert all(e["stage"] and e["type"] and e["message"].strip() for e in errors), case.name
        prepared = [row[prep_col(m)] is not None for m in MODELS]
        if row["error"]:
            assert not any(prepared) and row["width"] is None, case.name
        else:
            assert all(p or row[err_col(m)] for p, m in zip(prepared, MODELS, strict=True)), case.name
        if case.expect == EMBED:
            assert all(prepared) and not errors, (case.name, errors)
        if case.expect == ERROR:
            assert row["error"], case.name
            assert case.reason in (None, json.loads(row["error"])["type"]), case.name
        assert row["t__decode"] < DecodeConfig().timeout_s


def test_decode_task_turns_a_slow_decode_into_a_timeout_row(tmp_path, checkpoint):
    """The decode task decodes under the per-image time limit: a slow file costs one row, not the task."""
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)
    (tmp_path / "slow.png").write_bytes(encode(Image.fromarray(noise), "PNG"))
    (tmp_path / "fast.png").write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    rows = [{"uri": str(tmp_path / n), "size_bytes": 1, "source_version": "v", "models": ["dinov2"]}
            for n in ("slow.png", "fast.png")]  # fmt: skip
    out = decode_batch(
        pa.Table.from_pylist(rows, schema=INPUT_SCHEMA),
        models=[{"name": "dinov2", "weights": str(checkpoint("dinov2"))}],
        decode_timeout_s=1e-4,
    ).to_pylist()
    assert out[0]["error"], "slow.png was decoded without the time limit"
    error = json.loads(out[0]["error"])
    assert (error["stage"], error["type"]) == ("decode", "timeout") and "slow.png" in error["message"]
    assert out[0]["t__decode"] < 5 and out[0][prep_col("dinov2")] is None
    assert out[1]["error"] is None and out[1][prep_col("dinov2")] is not None  # the next file decodes


@pytest.mark.parametrize("message", ["", "   ", None])
def test_an_error_row_always_has_a_message(message):
    e = json.loads(error_json("embed", "AssertionError", message))
    assert e["message"] == "AssertionError raised without a message"
    assert (e["stage"], e["type"]) == ("embed", "AssertionError")
