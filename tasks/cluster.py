"""k-means over one model's pooled vectors, streamed from the lake in bounded batches (CUDA when present).

The vectors never sit in memory all at once. A seeded sample seeds greedy k-means++ and a few Lloyd rounds;
mini-batch passes over the stream then refine the centroids (each centroid moves by its batch mean with a
learning rate of 1/its count, the previous pass's centroid kept as a prior worth PRIOR of its support); a
last pass assigns every vector to its nearest centroid. Held at any time: k*D centroids, one batch, the
sample, and the narrow (image_id, uri, cluster, distance) columns that are written out.

With `normalize` (the default) vectors are L2-normalised first, so Euclidean k-means groups by cosine
similarity, as the vector search does; distances and inertia are then measured on the unit vectors.
"""

from __future__ import annotations

import json
import math
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from storage.lake import Lake, check_name
from storage.vector_stream import LakeVectors, VectorQueryError, VectorSource
from tasks import montage
from tasks.config import STORAGE_RETRIES

PRIOR = 0.1  # weight of the previous pass's centroid, as a fraction of its support, in the next pass


class ClusterError(VectorQueryError):
    """A request that cannot be clustered as asked (bad k, no vectors, bad --where): exit 2, one line."""


@dataclass(frozen=True)
class ClusterConfig:
    lake: str
    model: str
    k: int
    seed: int = 0
    where: str | None = None  # SQL over the embeddings view, e.g. "dataset = 'x' AND width > 512"
    batch_size: int = 4096  # vectors held at once
    max_iter: int = 20  # streaming passes at most
    tol: float = 1e-4  # stop once a pass lowers the inertia by less than this fraction
    sample_size: int = 16_384  # seeds k-means++ (and the silhouette); read in one extra pass
    init_iters: int = 10  # Lloyd rounds on the sample after k-means++
    n_init: int = 3  # seedings tried on the sample, the one of least sample inertia kept
    silhouette_sample: int = 2000
    normalize: bool = True
    device: str | None = None  # default: cuda when available, else cpu
    storage_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_name("model", self.model)
        if self.k < 2:
            raise ClusterError(f"--k must be at least 2, got {self.k}")
        if self.batch_size < 1 or self.max_iter < 1 or self.init_iters < 0 or self.n_init < 1:
            raise ClusterError("--batch-size and --max-iter must be positive")
        if self.seed < 0:
            raise ClusterError(f"--seed must be >= 0, got {self.seed}")
        if self.sample_size < self.k:
            raise ClusterError(f"sample_size ({self.sample_size}) must be at least k ({self.k})")
        if self.device is not None:
            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                raise ClusterError(f"--device {self.device!r} is not a torch device") from None
            if kind == "cuda" and not torch.cuda.is_available():
                raise ClusterError(f"--device {self.device}: CUDA is not available here")

    def open_lake(self) -> Lake:
        return Lake(self.lake, self.storage_options)


def open_vectors(cfg: ClusterConfig, source: VectorSource | None = None) -> LakeVectors:
    return LakeVectors(cfg.open_lake(), cfg.model, cfg.where, cfg.batch_size, source)


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _prepare(vectors: np.ndarray, device: torch.device, normalize: bool) -> torch.Tensor:
    """The batch on DEVICE, L2-normalised in place when asked (on CPU it shares the numpy batch's memory)."""
    x = torch.from_numpy(vectors).to(device, non_blocking=True)
    return x.div_(x.norm(dim=1, keepdim=True).clamp_min_(1e-12)) if normalize else x


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances, never negative."""
    return (x.pow(2).sum(1, keepdim=True) - 2.0 * (x @ c.T) + c.pow(2).sum(1)).clamp_min_(0.0)


def assign(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row: (labels, squared distances)."""
    d2, labels = sq_distances(x, c).min(dim=1)
    return labels, d2


def _sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts; a one-hot product is deterministic on GPUs (index_add_ is not)."""
    onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
    return onehot.T @ x, onehot.sum(0)


def kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (2 + log k candidates per step, the best kept), seeded by `gen` (a CPU generator)."""
    n, trials = x.shape[0], 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    closest = sq_distances(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        weights = closest.double().cpu()
        if float(weights.sum()) > 0:
            cand = torch.multinomial(weights, trials, replacement=True, generator=gen)
        else:  # every point sits on a centre already
            cand = torch.randint(n, (trials,), generator=gen)
        d = sq_distances(x, x[cand.to(x.device)])
        potential = torch.minimum(closest[:, None], d).sum(0)
        best = int(potential.argmin())
        closest = torch.minimum(closest, d[:, best])
        chosen.append(int(cand[best]))
    return x[chosen].clone()


def _reseed_empty(centroids: torch.Tensor, empty: torch.Tensor, sample: torch.Tensor) -> None:
    """Move centroids that got no points onto the sample points farthest from every centroid."""
    idx = torch.nonzero(empty).squeeze(1)
    if idx.numel():
        _, d2 = assign(sample, centroids)
        far = d2.topk(min(idx.numel(), sample.shape[0])).indices
        centroids[idx[: far.numel()]] = sample[far]


def lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain Lloyd rounds on an in-memory sample; returns (centroids, cluster sizes)."""
    k = centroids.shape[0]
    counts = torch.zeros(k, device=x.device)
    for _ in range(max(iters, 1)):
        labels, _ = assign(x, centroids)
        sums, counts = _sums(x, labels, k)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        _reseed_empty(moved, counts == 0, x)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids, counts


def silhouette(x: torch.Tensor, labels: torch.Tensor, k: int) -> float | None:
    """Mean silhouette of a sample (None with fewer than two clusters present): O(n^2) in the sample only."""
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    if int((counts > 0).sum()) < 2:
        return None
    onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
    totals = torch.cdist(x, x) @ onehot  # (n, k): summed distance to the members of each cluster
    own = counts[labels]
    a = totals.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    mean_other = totals / counts.clamp_min(1)
    mean_other[torch.arange(len(labels), device=labels.device), labels] = torch.inf
    mean_other[:, counts == 0] = torch.inf
    b = mean_other.min(1).values
    s = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-12), torch.zeros_like(a))
    return float(s.mean())


@dataclass
class KMeansFit:
    centroids: np.ndarray  # (k, dim) float32, in the (normalised) space clustered
    history: list[float]  # inertia of each streaming pass, measured as the pass went
    sample: np.ndarray  # the seeded sample as clustered (normalised when asked): silhouette
    converged: bool
    device: str


def draw_sample(reader: LakeVectors, size: int, seed: int) -> np.ndarray:
    """SIZE rows chosen uniformly (seeded) by position in the stream: one pass, SIZE x dim floats held."""
    rows = reader.source.rows
    picks = np.sort(np.random.default_rng(seed).choice(rows, size=min(size, rows), replace=False))
    out = np.empty((len(picks), reader.source.dim), dtype=np.float32)
    offset = filled = 0
    with closing(reader.batches()) as batches:  # stops reading once the sample is complete
        for batch in batches:
            lo, hi = np.searchsorted(picks, [offset, offset + len(batch)])
            out[lo:hi] = batch.vectors[picks[lo:hi] - offset]
            filled, offset = hi, offset + len(batch)
            if filled == len(picks):
                break
    return out[:filled]


def seed_centroids(sample: torch.Tensor, cfg: ClusterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ then Lloyd on the sample, n_init times; the least sample inertia wins (one unlucky
    seeding can put two centroids in one group and leave two groups to one; passes do not undo that)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    best = None
    for _ in range(cfg.n_init):
        centroids, sizes = lloyd(sample, kmeans_plus_plus(sample, cfg.k, gen), cfg.init_iters)
        inertia = float(assign(sample, centroids)[1].sum())
        if best is None or inertia < best[0]:
            best = (inertia, centroids, sizes)
    return best[1], best[2]


def fit(cfg: ClusterConfig, reader: LakeVectors) -> KMeansFit:
    """Seed on a sample, then refine with mini-batch passes over the stream until the inertia settles."""
    source, device = reader.source, resolve_device(cfg.device)
    if source.rows < cfg.k:
        raise ClusterError(f"--k {cfg.k} is more than the {source.rows} vectors to cluster")
    raw = draw_sample(reader, cfg.sample_size, cfg.seed)
    sample = _prepare(raw, device, cfg.normalize)
    centroids, sizes = seed_centroids(sample, cfg)
    counts = sizes * (source.rows / len(sample)) * PRIOR
    history: list[float] = []
    converged = False
    for _ in range(cfg.max_iter):
        inertia = torch.zeros((), dtype=torch.float64, device=device)
        seen = torch.zeros(cfg.k, device=device)
        for batch in reader.batches():
            x = _prepare(batch.vectors, device, cfg.normalize)
            labels, d2 = assign(x, centroids)
            inertia += d2.sum(dtype=torch.float64)
            sums, n = _sums(x, labels, cfg.k)
            seen += n
            counts += n
            centroids += (sums - n[:, None] * centroids) / counts.clamp_min(1e-12)[:, None]
        history.append(float(inertia))
        _reseed_empty(centroids, seen == 0, sample)
        counts = seen * PRIOR
        if len(history) > 1 and history[-2] - history[-1] <= cfg.tol * max(history[-1], 1e-30):
            converged = True
            break
    return KMeansFit(centroids.float().cpu().numpy(), history, sample.cpu().numpy(), converged, str(device))


class NearestTracker:
    """The `per` rows nearest to each centroid, kept while streaming (montage thumbnails)."""

    def __init__(self, per: int):
        self.per = per
        self.label = np.empty(0, np.int64)
        self.dist = np.empty(0, np.float32)
        self.uri = np.empty(0, object)

    def update(self, labels: np.ndarray, dist: np.ndarray, uris: pa.Array) -> None:
        pick = self._best(labels, dist)
        self.label = np.concatenate([self.label, labels[pick]])
        self.dist = np.concatenate([self.dist, dist[pick]])
        self.uri = np.concatenate([self.uri, np.array(uris.take(pa.array(pick)).to_pylist(), object)])
        keep = self._best(self.label, self.dist)
        self.label, self.dist, self.uri = self.label[keep], self.dist[keep], self.uri[keep]

    def _best(self, labels: np.ndarray, dist: np.ndarray) -> np.ndarray:
        order = np.lexsort((dist, labels))
        sorted_labels = labels[order]
        starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
        return order[np.arange(len(order)) - starts < self.per]

    def rows(self, cluster: int) -> list[tuple[str, float]]:
        mine = np.flatnonzero(self.label == cluster)
        mine = mine[np.argsort(self.dist[mine], kind="stable")]
        return [(str(self.uri[i]), float(self.dist[i])) for i in mine]


@dataclass
class ClusterResult:
    source: VectorSource
    k: int
    assignments: pa.Table  # image_id, uri, cluster, distance
    centroids: pa.Table  # cluster, size, centroid
    sizes: list[int]  # by cluster id; ids are ordered by size, largest first
    inertia: float  # final, every vector against the final centroids
    history: list[float]
    silhouette: float | None
    silhouette_sample: int
    nearest: list[list[tuple[str, float]]]  # per cluster: (uri, distance), nearest first
    converged: bool
    device: str


def assign_all(cfg: ClusterConfig, reader: LakeVectors, km: KMeansFit) -> ClusterResult:
    """The final pass: every vector to its nearest centroid; cluster ids renumbered by size, largest first."""
    device = resolve_device(cfg.device)
    centroids = torch.from_numpy(km.centroids).to(device)
    ids, uris, labels, dists = [], [], [], []
    tracker = NearestTracker(montage.MONTAGE_THUMBS)
    inertia = torch.zeros((), dtype=torch.float64, device=device)
    for batch in reader.batches():
        lab, d2 = assign(_prepare(batch.vectors, device, cfg.normalize), centroids)
        inertia += d2.sum(dtype=torch.float64)
        lab_np, dist_np = lab.cpu().numpy(), d2.sqrt().float().cpu().numpy()
        tracker.update(lab_np, dist_np, batch.uri)
        ids.append(batch.image_id)
        uris.append(batch.uri)
        labels.append(lab_np.astype(np.int32))
        dists.append(dist_np)
    label = np.concatenate(labels) if labels else np.empty(0, np.int32)
    sizes = np.bincount(label, minlength=cfg.k)
    order = np.argsort(-sizes, kind="stable")  # new id i is old cluster order[i]
    renumber = np.empty(cfg.k, np.int32)
    renumber[order] = np.arange(cfg.k, dtype=np.int32)
    assignments = pa.table(
        {
            "image_id": pa.chunked_array(ids, pa.string()),
            "uri": pa.chunked_array(uris, pa.string()),
            "cluster": pa.array(renumber[label], pa.int32()),
            "distance": pa.array(np.concatenate(dists) if dists else np.empty(0, np.float32), pa.float32()),
        }
    )
    ordered = km.centroids[order]
    table = pa.table(
        {
            "cluster": pa.array(np.arange(cfg.k, dtype=np.int32)),
            "size": pa.array(sizes[order].astype(np.int64)),
            "centroid": pa.FixedSizeListArray.from_arrays(pa.array(ordered.reshape(-1)), ordered.shape[1]),
        }
    )
    sample = torch.from_numpy(km.sample[: cfg.silhouette_sample]).to(device)
    sample_labels, _ = assign(sample, torch.from_numpy(ordered).to(device))
    return ClusterResult(
        source=reader.source, k=cfg.k, assignments=assignments, centroids=table,
        sizes=sizes[order].tolist(), inertia=float(inertia), history=km.history,
        silhouette=silhouette(sample, sample_labels, cfg.k), silhouette_sample=len(sample),
        nearest=[tracker.rows(int(old)) for old in order], converged=km.converged, device=km.device,
    )  # fmt: skip


def run_dir(model: str, run_id: str) -> str:
    return f"clusters/model={check_name('model', model)}/run={check_name('run id', run_id)}"


def summary_of(cfg: ClusterConfig, result: ClusterResult, run_id: str, lake: Lake) -> dict:
    """The run in JSON-able form: what the CLI prints, the flow returns and summary.json records."""
    rel = run_dir(cfg.model, run_id)
    return {
        "run_id": run_id, "model": cfg.model, "revision": result.source.revision, "dim": result.source.dim,
        "rows": result.source.rows, "other_revisions": result.source.other_revisions, "k": cfg.k,
        "seed": cfg.seed, "where": cfg.where, "normalize": cfg.normalize, "batch_size": cfg.batch_size,
        "sizes": result.sizes, "inertia": result.inertia, "inertia_per_pass": result.history,
        "passes": len(result.history), "converged": result.converged, "silhouette": result.silhouette,
        "silhouette_sample": result.silhouette_sample, "device": result.device,
        "outputs": {name: lake.uri(f"{rel}/{name}") for name in
                    ("assignments.parquet", "centroids.parquet", "montage.png", "inertia.png")},
    }  # fmt: skip


# -- Prefect tasks ---------------------------------------------------------------------------------------
@task(name="describe-vectors", cache_policy=NO_CACHE)
def describe_vectors(cfg: ClusterConfig) -> VectorSource:
    return open_vectors(cfg).source


@task(name="fit-kmeans", cache_policy=NO_CACHE)
def fit_kmeans(cfg: ClusterConfig, source: VectorSource) -> KMeansFit:
    return fit(cfg, open_vectors(cfg, source))


@task(name="assign-clusters", cache_policy=NO_CACHE)
def assign_clusters(cfg: ClusterConfig, source: VectorSource, km: KMeansFit) -> ClusterResult:
    return assign_all(cfg, open_vectors(cfg, source), km)


@task(name="write-clusters", **STORAGE_RETRIES)
def write_clusters(cfg: ClusterConfig, result: ClusterResult, run_id: str) -> dict:
    """assignments.parquet, centroids.parquet and summary.json, each appearing whole (Lake.write_*)."""
    lake, rel = cfg.open_lake(), run_dir(cfg.model, run_id)
    lake.write_parquet(f"{rel}/assignments.parquet", result.assignments)
    lake.write_parquet(f"{rel}/centroids.parquet", result.centroids)
    summary = summary_of(cfg, result, run_id, lake)
    lake.write_bytes(f"{rel}/summary.json", json.dumps(summary, indent=2).encode())
    return summary


def cluster_pictures(cfg: ClusterConfig, result: ClusterResult) -> dict[str, bytes]:
    """montage.png (nearest-to-centroid thumbnails per cluster) and inertia.png, as PNG bytes."""
    n = result.source.rows
    rows = [
        montage.Row(f"cluster {c}", f"{size} images ({size / max(n, 1):.0%})",
                    [montage.Tile(uri, montage.caption(f"{d:.3f}", uri)) for uri, d in result.nearest[c]])
        for c, size in enumerate(result.sizes)
    ]  # fmt: skip
    shown = min(cfg.k, montage.MONTAGE_MAX_ROWS)
    title = (f"{cfg.model}: k={cfg.k} over {n} images, nearest to each centroid"
             + (f" (largest {shown} of {cfg.k} clusters)" if shown < cfg.k else ""))  # fmt: skip
    grid = montage.draw_grid(
        title, rows, shown, montage.MONTAGE_THUMBS, montage.image_loader(cfg.storage_options)
    )
    sil = "n/a" if result.silhouette is None else f"{result.silhouette:.3f}"
    chart = montage.line_chart(
        result.history,
        f"k-means inertia per pass ({cfg.model}, k={cfg.k}, {n} vectors)",
        f"final inertia {result.inertia:.6g}; silhouette {sil} (sample of {result.silhouette_sample})",
        "pass over the data",
    )
    return {"montage.png": montage.png_bytes(grid), "inertia.png": montage.png_bytes(chart)}


@task(name="draw-clusters", **STORAGE_RETRIES)
def draw_clusters(cfg: ClusterConfig, result: ClusterResult, run_id: str) -> list[str]:
    lake, rel = cfg.open_lake(), run_dir(cfg.model, run_id)
    for name, data in cluster_pictures(cfg, result).items():
        lake.write_bytes(f"{rel}/{name}", data)
    return [lake.uri(f"{rel}/{name}") for name in ("montage.png", "inertia.png")]


@task(name="report-clusters", cache_policy=NO_CACHE)
def report_clusters(summary: dict) -> dict:
    """Prefect artifacts: a table of cluster sizes and a markdown report (inertia per pass, silhouette)."""
    rows = summary["rows"]
    sizes = [
        {"cluster": c, "size": s, "share": round(s / max(rows, 1), 4)} for c, s in enumerate(summary["sizes"])
    ]
    create_table_artifact(sizes, key="cluster-sizes", description=f"k-means run {summary['run_id']}")
    passes = "\n".join(f"| {i + 1} | {v:.6g} |" for i, v in enumerate(summary["inertia_per_pass"]))
    sil = summary["silhouette"]
    outputs = "\n".join(f"- {name}: `{uri}`" for name, uri in summary["outputs"].items())
    create_markdown_artifact(
        f"# k-means `{summary['run_id']}`\n\n"
        f"- model `{summary['model']}` revision `{summary['revision']}`, {rows} vectors of dim "
        f"{summary['dim']}, k={summary['k']}, seed {summary['seed']}, where `{summary['where'] or '-'}`\n"
        f"- final inertia {summary['inertia']:.6g} ({summary['inertia'] / max(rows, 1):.4g} per vector), "
        f"silhouette {'n/a' if sil is None else f'{sil:.3f}'} (sample of {summary['silhouette_sample']})\n"
        f"- passes {summary['passes']} (converged: {summary['converged']}), device {summary['device']}\n\n"
        f"| pass | inertia |\n|---|---|\n{passes}\n\n"
        "| cluster | size |\n|---|---|\n"
        + "\n".join(f"| {c} | {s} |" for c, s in enumerate(summary["sizes"]))
        + f"\n\n{outputs}\n",
        key="cluster-report",
    )
    return summary
