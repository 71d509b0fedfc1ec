"""Near-duplicate groups from k-NN queries against a model's vector table, and exact duplicates via SQL.

Each image asks the table (its ANN index once built) for its k nearest neighbours; pairs at or above the
cosine threshold are joined with union-find, so a group is a connected component of the threshold graph.
Memory is O(batch + images that have a near duplicate): no N x N similarity matrix exists anywhere. A
group larger than k+1 is still found whole as long as its members' neighbour lists chain together.
Exact duplicates are the same bytes (the same image_id) under several uris: the vector table keeps one
row per image_id, so they are read from the embeddings Parquet with DuckDB instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from storage.lake import Lake, check_name
from storage.sql import connect, views
from storage.vectors import KEY_COLUMN, VECTOR_COLUMN, VectorTable, lance_storage_options, lance_uri
from tasks import montage
from tasks.config import STORAGE_RETRIES

OUTPUTS = ("groups.parquet", "exact.parquet", "groups.png")


class DedupError(ValueError):
    """A request that cannot be run as asked (no table for the model, bad threshold or --where): exit 2."""


@dataclass(frozen=True)
class DedupConfig:
    lake: str
    model: str
    threshold: float = 0.95  # cosine similarity at or above which two images are near duplicates
    k: int = 10  # neighbours asked per image
    where: str | None = None  # filter on the vector table's columns (dataset, uri, width, height, ...)
    batch_size: int = 1024  # rows read from the table at once
    workers: int = 4  # concurrent k-NN queries (LanceDB searches outside the GIL)
    storage_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_name("model", self.model)
        if not 0.0 < self.threshold <= 1.0:
            raise DedupError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.k < 1 or self.batch_size < 1 or self.workers < 1:
            raise DedupError("--k, batch size and workers must be positive")

    def open_lake(self) -> Lake:
        return Lake(self.lake, self.storage_options)


class UnionFind:
    """Disjoint sets over hashable keys, created on first sight (only images with a neighbour enter)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}

    def find(self, x: str) -> str:
        root = self.parent.setdefault(x, x)
        while root != self.parent[root]:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size.get(ra, 1) < self.size.get(rb, 1):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] = self.size.get(ra, 1) + self.size.pop(rb, 1)

    def groups(self) -> list[list[str]]:
        members: dict[str, list[str]] = {}
        for x in self.parent:
            members.setdefault(self.find(x), []).append(x)
        return [sorted(m) for m in members.values()]


@dataclass
class NearDuplicates:
    groups: pa.Table  # image_id, uri, group_id, nearest, score; group 0 the largest
    images: int  # images queried
    queries: int
    max_batch_rows: int  # the most table rows held at once


def open_table(cfg: DedupConfig) -> VectorTable:
    """The model's existing vector table (never created here: dedup only reads); a bad --where fails now."""
    lake = cfg.open_lake()
    if not lake.exists(f"lance/{cfg.model}.lance"):
        raise DedupError(f"no vector table for model {cfg.model!r} in {lake.url}: embed with it first")
    options = lance_storage_options(cfg.storage_options, cfg.lake) or None
    schema = lancedb.connect(lance_uri(cfg.lake), storage_options=options).open_table(cfg.model).schema
    dim = schema.field(VECTOR_COLUMN).type.list_size
    table = VectorTable.open(cfg.lake, cfg.model, dim, cfg.storage_options)
    if cfg.where:
        try:  # LanceDB parses a filter only when a query runs
            table.table.search().where(cfg.where).select([KEY_COLUMN]).limit(1).to_arrow()
        except Exception as e:  # noqa: BLE001 - LanceDB raises ValueError, RuntimeError or its own types
            raise DedupError(f"--where {cfg.where!r}: {_first_line(e)}") from None
    return table


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _rows(table: VectorTable, where: str | None, batch_size: int) -> Iterator[pa.RecordBatch]:
    query = table.table.search().select([KEY_COLUMN, "uri", VECTOR_COLUMN]).limit(None)
    if where:
        query = query.where(where)
    for record in query.to_batches(batch_size):
        for start in range(0, record.num_rows, batch_size):
            yield record.slice(start, batch_size)


class _Graph:
    """Union-find plus, per image in a group, its most similar member and that member's uri."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.sets = UnionFind()
        self.best: dict[str, tuple[float, str]] = {}
        self.uris: dict[str, str] = {}

    def add(self, image_id: str, uri: str, found: pa.Table) -> None:
        scores = 1.0 - found.column("_distance").to_numpy()
        others, other_uris = found.column(KEY_COLUMN).to_pylist(), found.column("uri").to_pylist()
        for other, other_uri, score in zip(others, other_uris, scores.tolist(), strict=True):
            if other == image_id or score < self.threshold:
                continue
            self.sets.union(image_id, other)
            self.uris[image_id], self.uris[other] = uri, other_uri
            for a, b in ((image_id, other), (other, image_id)):
                if score > self.best.get(a, (-2.0, ""))[0]:
                    self.best[a] = (score, b)


def near_duplicates(cfg: DedupConfig, table: VectorTable) -> NearDuplicates:
    """k-NN of every (filtered) image, batch by batch, joined into groups at or above the threshold.

    Each query asks the table for k+1 rows (the image finds itself): `table.query` is the only search.
    """

    def search(vector: np.ndarray) -> pa.Table:
        query = table.query(vector, k=cfg.k + 1, where=cfg.where)
        return query.select([KEY_COLUMN, "uri", "_distance"]).to_arrow()

    graph = _Graph(cfg.threshold)
    images = max_rows = 0
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        for batch in _rows(table, cfg.where, cfg.batch_size):
            max_rows = max(max_rows, batch.num_rows)
            flat = batch.column(VECTOR_COLUMN).flatten().to_numpy(zero_copy_only=False)
            vectors = np.asarray(flat, np.float32).reshape(batch.num_rows, table.dim)
            ids, uris = batch.column(KEY_COLUMN).to_pylist(), batch.column("uri").to_pylist()
            for image_id, uri, found in zip(ids, uris, pool.map(search, vectors), strict=True):
                graph.add(image_id, uri, found)
            images += batch.num_rows
    return NearDuplicates(_group_table(graph.sets, graph.best, graph.uris), images, images, max_rows)


def _group_table(sets: UnionFind, best: dict[str, tuple[float, str]], uris: dict[str, str]) -> pa.Table:
    groups = sorted(sets.groups(), key=lambda g: (-len(g), g[0]))
    ids = [i for g in groups for i in g]
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "uri": pa.array([uris[i] for i in ids], pa.string()),
            "group_id": pa.array([gid for gid, g in enumerate(groups) for _ in g], pa.int32()),
            "nearest": pa.array([best[i][1] for i in ids], pa.string()),
            "score": pa.array([best[i][0] for i in ids], pa.float32()),
        }
    )


EXACT_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("group_id", pa.int32())])


def _duck(cfg: DedupConfig) -> duckdb.DuckDBPyConnection | None:
    """A DuckDB connection over the lake, with cfg.where checked there too (None: no embeddings yet)."""
    con = connect(cfg.open_lake())
    if "embeddings" not in views(con):
        return None
    if cfg.where:
        try:
            if len(con.extract_statements(f"SELECT 1 WHERE ({cfg.where})")) != 1:
                raise DedupError(f"--where must be one SQL expression, got {cfg.where!r}")
            con.sql(f"SELECT 1 FROM embeddings WHERE ({cfg.where}) LIMIT 0").fetchall()
        except duckdb.Error as e:
            raise DedupError(f"--where {cfg.where!r}: {_first_line(e)}") from None
    return con


def check_where(cfg: DedupConfig) -> None:
    """Fail now, with one line, if DuckDB cannot read cfg.where (open_table checks LanceDB's side)."""
    _duck(cfg)


def exact_duplicates(cfg: DedupConfig) -> pa.Table:
    """(image_id, uri, group_id): the same bytes under several uris, read from the embeddings Parquet."""
    con = _duck(cfg)
    if con is None:
        return EXACT_SCHEMA.empty_table()
    where = f" AND ({cfg.where})" if cfg.where else ""
    sql = f"""
        WITH rows AS (SELECT DISTINCT image_id, uri FROM embeddings WHERE model = $model{where}),
             dup AS (SELECT image_id, count(*) AS n FROM rows GROUP BY image_id HAVING count(*) > 1)
        SELECT r.image_id, r.uri,
               CAST(dense_rank() OVER (ORDER BY d.n DESC, r.image_id) - 1 AS INTEGER) AS group_id
        FROM rows r JOIN dup d USING (image_id) ORDER BY group_id, r.uri"""
    return con.sql(sql, params={"model": cfg.model}).to_arrow_table().cast(EXACT_SCHEMA)


def run_dir(model: str, run_id: str) -> str:
    return f"duplicates/model={check_name('model', model)}/run={check_name('run id', run_id)}"


def groups_picture(cfg: DedupConfig, near: pa.Table, exact: pa.Table) -> bytes:
    """groups.png: the largest near-duplicate groups, a row each, members by similarity."""
    rows = []
    for gid in range(min(montage.GROUP_ROWS, _count_groups(near))):  # group ids run largest first
        members = near.filter(pc.equal(near["group_id"], gid)).sort_by([("score", "descending")])
        pairs = zip(members["uri"].to_pylist(), members["score"].to_pylist(), strict=True)
        tiles = [montage.Tile(uri, montage.caption(f"{score:.4f}", uri)) for uri, score in pairs]
        rows.append(montage.Row(f"group {gid}", f"{members.num_rows} images", tiles))
    groups = _count_groups(near)
    shown = f", the largest {montage.GROUP_ROWS} shown" if groups > montage.GROUP_ROWS else ""
    title = (f"{cfg.model}: {groups} near-duplicate groups (cosine >= {cfg.threshold}){shown}; "
             f"{_count_groups(exact)} files stored under several uris")  # fmt: skip
    grid = montage.draw_grid(title, rows, montage.GROUP_ROWS, montage.GROUP_THUMBS,
                             montage.image_loader(cfg.storage_options))  # fmt: skip
    return montage.png_bytes(grid)


def _count_groups(table: pa.Table) -> int:
    return len(set(table["group_id"].to_pylist()))


def summary_of(cfg: DedupConfig, run_id: str, near: NearDuplicates, exact: pa.Table, lake: Lake) -> dict:
    rel = run_dir(cfg.model, run_id)
    sizes = np.bincount(near.groups["group_id"].to_numpy()).tolist() if near.groups.num_rows else []
    return {
        "run_id": run_id, "model": cfg.model, "threshold": cfg.threshold, "k": cfg.k, "where": cfg.where,
        "images": near.images, "near_groups": len(sizes), "near_images": near.groups.num_rows,
        "group_sizes": sizes, "exact_groups": _count_groups(exact), "exact_rows": exact.num_rows,
        "outputs": {name: lake.uri(f"{rel}/{name}") for name in OUTPUTS},
    }  # fmt: skip


# -- Prefect tasks ---------------------------------------------------------------------------------------
@task(name="find-near-duplicates", cache_policy=NO_CACHE)
def find_near_duplicates(cfg: DedupConfig) -> NearDuplicates:
    return near_duplicates(cfg, open_table(cfg))


@task(name="find-exact-duplicates", cache_policy=NO_CACHE)
def find_exact_duplicates(cfg: DedupConfig) -> pa.Table:
    return exact_duplicates(cfg)


@task(name="write-duplicates", **STORAGE_RETRIES)
def write_duplicates(cfg: DedupConfig, run_id: str, near: NearDuplicates, exact: pa.Table) -> dict:
    """groups.parquet, exact.parquet, groups.png and summary.json, each appearing whole."""
    lake, rel = cfg.open_lake(), run_dir(cfg.model, run_id)
    lake.write_parquet(f"{rel}/groups.parquet", near.groups)
    lake.write_parquet(f"{rel}/exact.parquet", exact)
    lake.write_bytes(f"{rel}/groups.png", groups_picture(cfg, near.groups, exact))
    summary = summary_of(cfg, run_id, near, exact, lake)
    lake.write_bytes(f"{rel}/summary.json", json.dumps(summary, indent=2).encode())
    return summary


@task(name="report-duplicates", cache_policy=NO_CACHE)
def report_duplicates(summary: dict, near: NearDuplicates, exact: pa.Table) -> dict:
    """Prefect artifacts: the largest groups as a table, and a markdown summary."""
    top = near.groups.filter(pc.less(near.groups["group_id"], 20)).to_pylist()
    if top:
        create_table_artifact(top, key="duplicate-groups", description=f"dedup run {summary['run_id']}")
    outputs = "\n".join(f"- {name}: `{uri}`" for name, uri in summary["outputs"].items())
    create_markdown_artifact(
        f"# dedup `{summary['run_id']}`\n\n"
        f"- model `{summary['model']}`, {summary['images']} images, k={summary['k']}, "
        f"cosine >= {summary['threshold']}, where `{summary['where'] or '-'}`\n"
        f"- near-duplicate groups: {summary['near_groups']} ({summary['near_images']} images), "
        f"sizes {summary['group_sizes'][:20]}\n"
        f"- exact duplicates: {summary['exact_groups']} image_ids under {summary['exact_rows']} uris\n\n"
        f"{outputs}\n",
        key="dedup-report",
    )
    return summary
