"""`towerflow search` and towerflow.Lake.search: exact copies rank first, --where prefilters, other
revisions are refused, and the PNG grid has the size its layout says."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import towerflow
from storage.lake import Lake
from storage.manifest import list_manifests
from storage.vectors import VectorTable
from tasks import grid
from tasks.search import RESULT_SCHEMA, SearchResult, result_sheet

MODEL = "qwen2_5_vl"


def sheet_px(tiles: int) -> tuple[int, int]:
    """The grid's size from the layout constants: one row of TILE boxes with PAD around, captions below."""
    cols = min(tiles, grid.MAX_COLS)
    rows = -(-tiles // cols)
    return cols * 160 + (cols + 1) * 8, rows * (160 + 30) + (rows + 1) * 8


def one_line_error(rc: int, out: str, err: str, *words: str) -> str:
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("towerflow: error: "), err
    for word in words:
        assert word in lines[0]
    return lines[0]


def cosine_ranking(lake, i: int) -> list[str]:
    v = lake.vectors / np.linalg.norm(lake.vectors, axis=1, keepdims=True)
    return [lake.ids[j] for j in np.argsort(-(v @ v[i]), kind="stable")]


def test_a_copy_of_a_corpus_image_ranks_first(search_lake, run_cli, tmp_path):
    query = tmp_path / "elsewhere" / "query.png"
    query.parent.mkdir()
    shutil.copy(search_lake.paths[2], query)
    out_dir = tmp_path / "results"
    rc, out, err = run_cli("search", search_lake.root, "--query-image", query, "-k", 3, "--json",
                           "--output-dir", out_dir)  # fmt: skip
    assert rc == 0, err
    result = json.loads(out)
    hits = result["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["image_id"] == search_lake.ids[2] and hits[0]["uri"] == str(search_lake.paths[2])
    assert hits[0]["score"] >= 0.999
    assert [h["image_id"] for h in hits] == cosine_ranking(search_lake, 2)[:3]
    assert hits[0]["score"] > hits[1]["score"] >= hits[2]["score"]
    assert result["query"] == {"kind": "image", "image_id": search_lake.ids[2], "uri": str(query)}
    assert result["model"] == MODEL and result["revision"] == search_lake.revision
    png = out_dir / result["png"].rsplit("/", 1)[-1]
    assert png.is_file() and png.stat().st_size > 1000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == sheet_px(4) == (680, 206)


def test_image_id_uses_the_stored_vector(search_lake, run_cli, tmp_path):
    rc, out, err = run_cli("search", search_lake.root, "--image-id", search_lake.ids[5], "-k", 8,
                           "--output-dir", tmp_path)  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"model {MODEL}@{search_lake.revision[:12]}  query {search_lake.paths[5]}"
    assert lines[1].split() == ["rank", "score", "dataset", "uri"]
    rows = [line.split() for line in lines[2:10]]
    assert [int(r[0]) for r in rows] == list(range(1, 9))
    assert rows[0][3] == str(search_lake.paths[5]) and float(rows[0][1]) >= 0.999
    by_uri = dict(zip(map(str, search_lake.paths), search_lake.ids, strict=True))
    assert [by_uri[r[3]] for r in rows] == cosine_ranking(search_lake, 5)
    assert [r[2] for r in rows] == [search_lake.datasets[search_lake.ids.index(by_uri[r[3]])] for r in rows]
    assert lines[10].startswith("grid: ") and lines[10].endswith(".png")
    with Image.open(lines[10][len("grid: ") :]) as im:
        assert im.size == sheet_px(9) == (6 * 160 + 7 * 8, 2 * 190 + 3 * 8)


@pytest.mark.parametrize(
    "where, keep",
    [
        ("dataset = 'b'", lambda ds, w: ds == "b"),
        ("dataset = 'b' AND width > 90", lambda ds, w: ds == "b" and w > 90),
        ("dataset = 'a' OR width = 80", lambda ds, w: ds == "a" or w == 80),
    ],
)
def test_where_prefilters_the_search(search_lake, run_cli, tmp_path, where, keep):
    expected = {i for i, d, w in zip(search_lake.ids, search_lake.datasets, search_lake.widths, strict=True)
                if keep(d, w)}  # fmt: skip
    assert 0 < len(expected) < 8
    rc, out, err = run_cli("search", search_lake.root, "--query-image", search_lake.paths[0], "-k", 8,
                           "--where", where, "--json", "--output-dir", tmp_path)  # fmt: skip
    assert rc == 0, err
    result = json.loads(out)
    assert {h["image_id"] for h in result["results"]} == expected
    ranking = [i for i in cosine_ranking(search_lake, 0) if i in expected]
    assert [h["image_id"] for h in result["results"]] == ranking
    assert result["where"] == where


def test_exact_and_ann_agree_on_a_small_table(search_lake, run_cli, tmp_path):
    runs = [run_cli("search", search_lake.root, "--image-id", search_lake.ids[7], "-k", 4, "--json",
                    "--output-dir", tmp_path, *extra) for extra in ((), ("--exact",))]  # fmt: skip
    assert [rc for rc, _, _ in runs] == [0, 0]
    ids = [[h["image_id"] for h in json.loads(out)["results"]] for _, out, _ in runs]
    assert ids[0] == ids[1] == cosine_ranking(search_lake, 7)[:4]


def test_refuses_weights_of_another_revision(search_lake, run_cli, checkpoint, tmp_path):
    other = checkpoint(MODEL, seed=1)
    rc, out, err = run_cli("search", search_lake.root, "--query-image", search_lake.paths[0], "--weights",
                           other, "--output-dir", tmp_path)  # fmt: skip
    one_line_error(rc, out, err, "revision", search_lake.revision[:12], "--weights")
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--image-id", "f" * 64], ["image id", "not in the"]),
        (["--image-id", "f" * 64, "--model", "m", "LAKE/missing"], ["does not exist"]),
        (["--image-id", "x", "--model", "dinov2"], ["dinov2", "models there: qwen2_5_vl"]),
        (["--image-id", "x", "--model", "../etc"], ["not allowed"]),
        (["--query-image", "QUERY", "--where", "dataset ==="], ["--where", "dataset ==="]),
        (["--query-image", "QUERY", "--where", "nosuchcolumn = 1"], ["nosuchcolumn"]),
        (["--query-image", "/no/such/file.png"], ["does not exist"]),
        (["--query-image", "QUERY", "--weights", "/no/such/ckpt"], ["cannot load", "/no/such/ckpt"]),
    ],
)
def test_user_mistakes_exit_2_with_one_line(search_lake, run_cli, tmp_path, argv, words):
    argv = [str(search_lake.paths[1]) if a == "QUERY" else a for a in argv]
    lake = next((a.replace("LAKE", str(tmp_path)) for a in argv if a.startswith("LAKE")), search_lake.root)
    argv = [a for a in argv if not a.startswith("LAKE")]
    rc, out, err = run_cli("search", lake, *argv, "--output-dir", tmp_path)
    one_line_error(rc, out, err, *words)


def test_several_models_need_a_choice(run_cli, tmp_path):
    root = tmp_path / "lake"
    for name in ("m1", "m2"):
        rows = pa.table(
            {
                "image_id": ["i"],
                "uri": ["u"],
                "dataset": ["d"],
                "model_revision": ["r"],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0.0], pa.float32()), 2),
            }
        )
        VectorTable.open(str(root), name, 2).merge(rows)  # fmt: skip
    rc, out, err = run_cli("search", root, "--image-id", "i", "--output-dir", tmp_path)
    one_line_error(rc, out, err, "several models (m1, m2)", "--model")
    rc, out, err = run_cli(
        "search", root, "--image-id", "i", "--model", "m2", "--json", "--output-dir", tmp_path
    )
    assert rc == 0 and json.loads(out)["results"][0]["uri"] == "u"
    rc, out, err = run_cli(
        "search", root, "--query-image", __file__, "--model", "m1", "--output-dir", tmp_path
    )
    one_line_error(rc, out, err, "no weights recorded for m1", "--weights")


def test_the_lake_object(search_lake):
    lake = towerflow.Lake(str(search_lake.root))
    assert lake.models() == [MODEL]
    table = lake.search(query_image=str(search_lake.paths[6]), k=3)
    assert table.schema == RESULT_SCHEMA
    assert table.column_names == ["rank", "score", "image_id", "uri", "dataset", "width", "height"]
    assert table["image_id"].to_pylist() == cosine_ranking(search_lake, 6)[:3]
    assert table["rank"].to_pylist() == [1, 2, 3] and table["score"][0].as_py() >= 0.999
    assert table["width"][0].as_py() == search_lake.widths[6] and table["dataset"][0].as_py() == "b"
    by_bytes = lake.search(search_lake.paths[6].read_bytes(), k=1, where="dataset = 'a'")
    assert by_bytes["dataset"].to_pylist() == ["a"]
    assert len(lake._encoders) == 1  # loaded once, reused
    by_id = towerflow.search(str(search_lake.root), image_id=search_lake.ids[3], k=2)
    assert by_id["image_id"][0].as_py() == search_lake.ids[3]
    runs = lake.runs()
    assert [r.status for r in runs] == ["succeeded"] and runs[0].encoders[0].revision == search_lake.revision
    counts = lake.sql("SELECT dataset, count(*) AS n FROM embeddings GROUP BY ALL ORDER BY dataset")
    assert counts.to_pylist() == [{"dataset": "a", "n": 4}, {"dataset": "b", "n": 4}]
    with pytest.raises(towerflow.SearchError, match="cannot load"):
        lake.search(str(search_lake.paths[0]), weights=str(search_lake.weights) + "-nope")
    assert "storage" not in repr(towerflow.Lake("s3://b/lake", {"secret": "s3cr3t"}))


def test_a_missing_source_becomes_an_unreadable_tile(tmp_path):
    present = tmp_path / "present.png"
    Image.new("RGB", (300, 100), (250, 0, 0)).save(present)
    rows = pa.table({"rank": [1, 2], "score": [0.9, 0.5], "image_id": ["a", "b"],
                     "uri": [str(present), str(tmp_path / "gone.png")], "dataset": ["d", "d"],
                     "width": [300, 1], "height": [100, 1]}, schema=RESULT_SCHEMA)  # fmt: skip
    result = SearchResult(
        MODEL, "rev", {"kind": "image_id", "image_id": "a", "uri": str(present)}, None, rows
    )
    sheet = result_sheet(result)
    assert sheet.size == sheet_px(3)
    tile = lambda i: sheet.crop((8 + i * 168, 8, 8 + i * 168 + 160, 168))  # noqa: E731
    assert np.array_equal(np.asarray(tile(2)), np.asarray(grid.placeholder("unreadable")))
    red = np.asarray(tile(1))[80, 80]  # the 300x100 image fitted: 160x53, centred
    assert tuple(red) == (250, 0, 0) and tuple(np.asarray(tile(1))[10, 80]) == grid.TILE_BACKGROUND
    assert np.asarray(tile(0))[1, 80].tolist() == list(grid.HIGHLIGHT)  # the query's frame
    assert grid.load_thumbnail(b"not an image").size == (160, 160)


@pytest.mark.slow
def test_one_shot_builds_then_reuses_a_lake(run_cli, checkpoint, tmp_path, ray_local, prefect_harness):
    corpus = tmp_path / "photos"
    corpus.mkdir()
    from _support import smooth_image

    for i in range(6):
        smooth_image(72 + 8 * i, 96, seed=300 + i).save(corpus / f"p{i}.png")
    query = tmp_path / "q.png"
    shutil.copy(corpus / "p4.png", query)
    weights, out_dir = checkpoint(MODEL), tmp_path / "search_results"
    argv = ["search", "--image-dir", corpus, "--query-image", query, "-k", 3, "--weights", weights,
            "--output-dir", out_dir, "--json"]  # fmt: skip
    rc, out, err = run_cli(*argv)
    assert rc == 0, err
    first = json.loads(out)
    assert first["embedded"]["counts"]["embedded"] == 6 and first["embedded"]["counts"]["errors"] == 0
    assert first["results"][0]["uri"].endswith("p4.png") and first["results"][0]["score"] >= 0.999
    assert first["lake"] == str((out_dir / "lake").resolve())
    lake = Lake(str(out_dir / "lake"))
    assert len(list_manifests(lake)) == 1
    rc, out, err = run_cli(*argv)  # reuse: no flow run, no new manifest
    assert rc == 0, err
    second = json.loads(out)
    assert "embedded" not in second and second["results"] == first["results"]
    assert len(list_manifests(lake)) == 1
    rc, out, err = run_cli(*argv[:-1], "--quiet")  # text output names the reused lake
    assert rc == 0 and out.splitlines()[0].startswith(f"reusing {lake.url}")
    rc, out, err = run_cli(*argv, "--build-index")  # runs the flow again: nothing new to embed
    assert rc == 0, err
    third = json.loads(out)
    assert third["embedded"]["counts"]["embedded"] == 0 and third["embedded"]["counts"]["skipped_done"] == 6
    assert len(list_manifests(lake)) == 2 and len(list(out_dir.glob("search-*.png"))) == 4
    other = tmp_path / "other"
    other.mkdir()
    rc, out, err = run_cli("search", "--image-dir", other, "--query-image", query, "--weights", weights,
                           "--output-dir", out_dir)  # fmt: skip
    one_line_error(rc, out, err, "is the lake of", "--output-dir")


def test_a_table_of_two_revisions_is_searched_within_the_query_revision(run_cli, tmp_path):
    root = tmp_path / "lake"
    vectors = [[1.0, 0.0], [0.9, 0.1], [1.0, 0.01], [0.0, 1.0]]
    rows = pa.table(
        {
            "image_id": ["a", "b", "c", "d"],
            "uri": ["ua", "ub", "uc", "ud"],
            "dataset": ["x"] * 4,
            "model_revision": ["r1", "r1", "r2", "r2"],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(sum(vectors, []), pa.float32()), 2),
        }
    )
    VectorTable.open(str(root), "m", 2).merge(rows)  # fmt: skip
    rc, out, err = run_cli("search", root, "--image-id", "a", "-k", 4, "--json", "--output-dir", tmp_path)
    result = json.loads(out)
    assert rc == 0 and [h["image_id"] for h in result["results"]] == ["a", "b"]
    assert (result["revision"], result["where"]) == ("r1", "model_revision = 'r1'")
    argv = ["--where", "dataset = 'x'", "-k", 4, "--json", "--output-dir", tmp_path]
    rc, out, err = run_cli("search", root, "--image-id", "d", *argv)
    assert [h["image_id"] for h in json.loads(out)["results"]] == ["d", "c"]
    assert json.loads(out)["where"] == "(model_revision = 'r2') AND (dataset = 'x')"


def test_a_lake_on_s3(s3, build_search_lake, checkpoint, run_cli, tmp_path):
    bucket, options = s3
    url = f"s3://{bucket}/lake"
    lake = build_search_lake(url, tmp_path / "corpus", checkpoint(MODEL), options)
    remote = towerflow.Lake(url, options)
    table = remote.search(str(lake.paths[4]), k=2, where="dataset = 'b'")
    assert table["image_id"].to_pylist()[0] == lake.ids[4] and table["score"][0].as_py() >= 0.999
    assert remote.sql("SELECT count(*) AS n FROM embeddings").to_pylist() == [{"n": 8}]
    endpoint = f"endpoint_url={options['endpoint_url']}"
    rc, out, err = run_cli("search", url, "--image-id", lake.ids[1], "-k", 1, "--json",
                           "--storage-option", endpoint, "--output-dir", tmp_path / "out")  # fmt: skip
    assert rc == 0, err
    assert [h["image_id"] for h in json.loads(out)["results"]] == [lake.ids[1]]
    assert json.loads(out)["lake"] == url
    query = "SELECT dataset, count(*) AS n FROM embeddings GROUP BY ALL ORDER BY 1"
    rc, out, err = run_cli("sql", url, query, "--csv", "--storage-option", endpoint)
    assert (rc, out) == (0, "dataset,n\na,4\nb,4\n"), err
