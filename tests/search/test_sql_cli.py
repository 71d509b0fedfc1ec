"""`towerflow sql`: the README's three queries on a lake built here, table / CSV / JSON output, errors."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

import towerflow

MODEL = "qwen2_5_vl"

# The README's queries, verbatim except for the placeholders (the README uses D = 3584, Qwen2.5-VL-7B).
ERRORS_BY_REASON = "SELECT stage, error_type, count(*) AS n FROM errors GROUP BY ALL ORDER BY n DESC, stage"
NEAREST = """
WITH q AS (SELECT embedding FROM embeddings WHERE model = 'qwen2_5_vl' AND image_id = '{id}' LIMIT 1)
SELECT e.image_id, e.uri, array_cosine_similarity(e.embedding::FLOAT[{D}], q.embedding::FLOAT[{D}]) AS score
  FROM embeddings e, q
 WHERE e.model = 'qwen2_5_vl' AND e.image_id <> '{id}'
 ORDER BY score DESC LIMIT 5
"""
PER_DATASET = (
    "SELECT model, dataset, count(DISTINCT image_id) AS images, count(*) AS rows FROM embeddings "
    "GROUP BY ALL ORDER BY ALL"
)


def nearest(lake, i: int) -> tuple[str, list[str], np.ndarray]:
    v = lake.vectors / np.linalg.norm(lake.vectors, axis=1, keepdims=True)
    sims = v @ v[i]
    order = [j for j in np.argsort(-sims, kind="stable") if j != i][:5]
    return NEAREST.format(id=lake.ids[i], D=lake.dim), [lake.ids[j] for j in order], sims[order]


def test_errors_by_reason_as_a_table(search_lake, run_cli):
    rc, out, err = run_cli("sql", search_lake.root, ERRORS_BY_REASON)
    assert rc == 0, err
    assert out.splitlines() == [
        "stage   error_type         n",
        "decode  truncated          2",
        "read    FileNotFoundError  1",
        "(2 rows)",
    ]


def test_nearest_neighbours_with_array_cosine_similarity(search_lake, run_cli):
    query, ids, sims = nearest(search_lake, 1)
    rc, out, err = run_cli("sql", search_lake.root, query, "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["image_id"] for r in rows] == ids
    assert np.allclose([r["score"] for r in rows], sims, atol=1e-5)
    assert rows[0]["uri"] == str(search_lake.paths[search_lake.ids.index(ids[0])])


def test_images_per_dataset_and_model_as_csv(search_lake, run_cli):
    rc, out, err = run_cli("sql", search_lake.root, PER_DATASET, "--csv")
    assert rc == 0, err
    assert list(csv.DictReader(io.StringIO(out))) == [
        {"model": MODEL, "dataset": "a", "images": "4", "rows": "4"},
        {"model": MODEL, "dataset": "b", "images": "4", "rows": "4"},
    ]


def test_vectors_nulls_and_timestamps_in_every_format(search_lake, run_cli):
    query = "SELECT image_id, embedding, NULL AS nothing, created_at FROM embeddings ORDER BY uri LIMIT 2"
    rc, out, _ = run_cli("sql", search_lake.root, query, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and [r["image_id"] for r in rows] == search_lake.ids[:2]
    assert np.allclose(json.loads(rows[0]["embedding"]), search_lake.vectors[0], atol=1e-6)
    assert rows[0]["nothing"] == "" and rows[0]["created_at"].startswith("2026-11-27 00:00:00")
    rc, out, _ = run_cli("sql", search_lake.root, query, "--json")
    rows = json.loads(out)
    assert rc == 0 and len(rows) == 2 and rows[1]["nothing"] is None
    assert np.allclose(rows[1]["embedding"], search_lake.vectors[1], atol=1e-6)
    rc, out, _ = run_cli("sql", search_lake.root, query)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["image_id", "embedding", "nothing", "created_at"]
    assert len(lines) == 4 and lines[-1] == "(2 rows)" and "NULL" in lines[1]
    assert max(len(line) for line in lines) < 64 + 60 + 60 + 40  # long cells are cut


@pytest.mark.parametrize(
    "query, words",
    [
        ("SELEC 1", ["Parser Error", "SELEC"]),
        ("SELECT * FROM clusters", ["clusters", "views in this lake: embeddings, errors"]),
        ("SELECT nope FROM embeddings", ["nope"]),
    ],
)
def test_sql_errors_exit_2_with_one_line(search_lake, run_cli, query, words):
    rc, out, err = run_cli("sql", search_lake.root, query)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("towerflow: error: ")
    assert all(w in lines[0] for w in words), lines[0]


def test_a_missing_lake_is_a_usage_error(run_cli, tmp_path):
    rc, out, err = run_cli("sql", tmp_path / "nothing-here", "SELECT 1")
    assert (rc, out) == (
        2,
        "",
    ) and err.strip() == f"towerflow: error: LAKE {tmp_path / 'nothing-here'} does not exist"


def test_lake_sql_returns_arrow(search_lake):
    lake = towerflow.Lake(str(search_lake.root))
    table = lake.sql(ERRORS_BY_REASON)
    assert table.column_names == ["stage", "error_type", "n"]
    assert table.to_pylist()[0] == {"stage": "decode", "error_type": "truncated", "n": 2}
    with pytest.raises(towerflow.SqlError, match="Parser Error"):
        lake.sql("SELEC 1")
