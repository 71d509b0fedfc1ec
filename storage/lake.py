"""The lake on any fsspec filesystem: hive-partitioned paths, safe names, atomic Parquet files.

Every Parquet file under embeddings/, patches/ and errors/ is committed: writers stage files under
_staging/<run_id>/ and the commit step moves them into place only after recording its intent (see
storage.commit). So plain readers may glob the visible datasets; nothing partial is ever there.
"""

from __future__ import annotations

import errno
import io
import re
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from storage.schema import KINDS

ROW_GROUP_ROWS = 64 * 1024  # large row groups keep DuckDB scans fast; shards are smaller anyway
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(what: str, value: str) -> str:
    """Dataset names, model names and run ids become path segments: they must not escape LAKE."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def redact_url(url: str) -> str:
    """Drop user:password@ from a URL before it goes into any output."""
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1", url)


# --- object-store robustness: retries of transient faults, access denied as a permanent failure ---------

# botocore's own retries (5xx, SlowDown/throttling, connection errors and resets) per request, below
# s3fs's retry loop and Prefect's task retries: a store failing 10% of requests must not fail one read or
# write (botocore's default, 4 retries, leaves ~1e-5 per request; 8 retries = 9 attempts, ~1e-9).
# "standard" caps each backoff at 20 s (legacy's doubling is unbounded). 403s are not retried. A
# caller's own config_kwargs["retries"] wins.
S3_CLIENT_RETRIES = {"max_attempts": 8, "mode": "standard"}
# S3 error codes (and HTTP 403 texts, as Lance's Rust client words them) that no retry can cure.
_DENIED_MARKERS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                   "403 Forbidden", "status 403", "status: 403")  # fmt: skip
DENIED = "access denied (HTTP 403 from the object store)"


class AccessDenied(PermissionError):
    """The object store refused access (HTTP 403). Permanent: never retried. str() is one line
    naming the redacted URL: `[Errno 13] access denied (...): 's3://bucket/key'`."""


def with_client_retries(url: str, options: dict | None) -> dict:
    """fsspec options for URL with S3_CLIENT_RETRIES added for s3 (unless the caller set retries)."""
    opts = dict(options or {})
    if fsspec.core.split_protocol(str(url))[0] not in ("s3", "s3a"):
        return opts
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", dict(S3_CLIENT_RETRIES))
    opts["config_kwargs"] = config
    return opts


def is_access_denied(exc: BaseException | None) -> bool:
    """True when EXC or an exception it wraps (cause, context, Ray's .cause) is an access denial."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PermissionError):
            return True
        text = str(exc)
        if any(marker in text for marker in _DENIED_MARKERS):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return False


@contextmanager
def denied_as(url: str) -> Iterator[None]:
    """Re-raise an object store's access denial as AccessDenied naming URL (redacted).

    A local PermissionError already names its path and is left as it is.
    """
    try:
        yield
    except AccessDenied:
        raise
    except Exception as e:
        if not is_access_denied(e) or (isinstance(e, PermissionError) and e.filename is not None):
            raise
        raise AccessDenied(errno.EACCES, DENIED, redact_url(url)) from e


@dataclass
class Lake:
    """LAKE: a local path or fsspec URL; storage_options go to fsspec and never into outputs."""

    root: str
    storage_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        options = with_client_retries(self.root, self.storage_options)
        self.fs, path = fsspec.core.url_to_fs(self.root, **options)
        self.base = path.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = protocol in ("file", "local")
        self.url = self.base if self.is_local else f"{protocol}://{self.base}"

    # -- paths -------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def uri(self, rel: str) -> str:
        """A full URI for REL, for readers outside fsspec (DuckDB, manifests)."""
        return f"{self.url}/{rel}"

    @staticmethod
    def dataset_dir(kind: str, dataset: str, model: str | None = None) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown dataset kind {kind!r}")
        check_name("dataset", dataset)
        if kind == "errors":
            return f"errors/dataset={dataset}"
        return f"{kind}/model={check_name('model', model or '')}/dataset={dataset}"

    @classmethod
    def shard_path(cls, kind: str, dataset: str, model: str | None, run_id: str, shard: str) -> str:
        check_name("run id", run_id)
        check_name("shard", shard)
        return f"{cls.dataset_dir(kind, dataset, model)}/{run_id}-{shard}.parquet"

    @staticmethod
    def staging_path(run_id: str, rel: str) -> str:
        return f"_staging/{check_name('run id', run_id)}/{rel}"

    # -- files -------------------------------------------------------------------------------------
    def write_parquet(self, rel: str, table: pa.Table) -> None:
        """Write REL so that it appears whole or not at all (temp + rename locally; one PUT on S3)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        with self.access(rel):
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            if self.is_local:
                tmp = f"{target}.tmp-{secrets.token_hex(4)}"
                with self.fs.open(tmp, "wb") as f:
                    f.write(data)
                self.fs.mv(tmp, target)
            else:
                self.fs.pipe_file(target, data)

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        with self.access(rel), self.fs.open(self.path(rel), "rb") as f:
            return pq.read_table(f, columns=columns)

    def exists(self, rel: str) -> bool:
        with self.access(rel):
            return self.fs.exists(self.path(rel))

    def access(self, rel: str) -> AbstractContextManager[None]:
        """Context: an access denial on REL becomes AccessDenied naming its URL (see denied_as)."""
        return denied_as(self.uri(rel))

    def move(self, src_rel: str, dst_rel: str) -> None:
        """Idempotent: a finished move (destination there, source gone) is not an error."""
        src, dst = self.path(src_rel), self.path(dst_rel)
        with self.access(dst_rel):
            if not self.fs.exists(src):
                if self.fs.exists(dst):
                    return
                raise FileNotFoundError(f"neither {src_rel} nor {dst_rel} exists in the lake")
            self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(src, dst)

    def remove(self, rel: str, recursive: bool = False) -> None:
        with self.access(rel):
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=recursive)

    def list_files(self, rel_dir: str, suffix: str = ".parquet") -> list[str]:
        """Relative paths of files under REL_DIR (recursive), sorted; empty when it does not exist."""
        root = self.path(rel_dir)
        with self.access(rel_dir):
            if not self.fs.exists(root):
                return []
            found = self.fs.find(root)
        prefix = self.base + "/"
        return sorted(p.removeprefix(prefix) for p in found if p.endswith(suffix))

    def committed_files(self, kind: str, model: str | None = None, dataset: str | None = None) -> list[str]:
        """Committed shard files of KIND (visible == committed; see the module docstring)."""
        rel = kind
        if kind != "errors" and model:
            rel += f"/model={check_name('model', model)}"
            if dataset:
                rel += f"/dataset={check_name('dataset', dataset)}"
        elif kind == "errors" and dataset:
            rel += f"/dataset={check_name('dataset', dataset)}"
        return self.list_files(rel)
