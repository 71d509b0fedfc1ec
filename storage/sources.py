"""Listing image sources (local paths, fsspec URLs, globs, manifests) as a stream of versioned items.

The plan stage diffs this listing against the run ledger, so every item carries a fully qualified uri
and a version (S3 ETag or ISO-8601 UTC mtime). Listings of millions of objects must not be held in
memory: directories are listed one at a time and manifests are read in batches. A problem with one
entry becomes a `ListError` (an error row of stage "list"); only an unusable SOURCE raises, and it
does so before anything is yielded. Storage option values (endpoints, keys, secrets) never appear in
messages.
"""

from __future__ import annotations

import csv
import errno
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from storage.lake import DENIED, AccessDenied, denied_as, is_access_denied, redact_url, with_client_retries

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
_COLUMNS = ("uri", "size_bytes", "source_version")  # of csv / parquet manifests, as in storage.schema

_GLOB_CHARS = frozenset("*?[")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_BATCH_ROWS = 4096  # parquet manifest rows held at once
# fmt: off
_MAGIC = (  # BigTIFF too ("+" instead of "*")
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
)
# fmt: on
_PROBE_BYTES = 1 << 20  # the up-front manifest check reads this much, not a whole 50 MiB S3 block


@dataclass(frozen=True)
class SourceItem:
    """One input object: the identity (uri) and version the ledger diffs against."""

    uri: str
    size: int | None
    version: str | None


@dataclass(frozen=True)
class ListError:
    """One entry that could not be listed; stored as an error row instead of aborting the run."""

    uri: str
    error_type: str
    message: str


@dataclass(frozen=True)
class SourceConfig:
    """What to list and how to reach it. storage_options go to fsspec only: they are never printed."""

    extensions: frozenset[str] = IMAGE_EXTENSIONS
    storage_options: dict = field(default_factory=dict, hash=False, compare=False, repr=False)

    def __post_init__(self):
        if isinstance(self.extensions, str):
            raise TypeError("extensions must be a collection of suffixes such as {'.jpg'}, not one string")
        exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions)
        object.__setattr__(self, "extensions", exts)


class SourceError(ValueError):
    """SOURCE itself is unusable (missing, unreadable, a manifest without a uri column)."""


def source_filesystem(
    source: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, protocol-stripped path) for a path or URL; local paths need no options.

    One filesystem by the URL's protocol, never fsspec's URL chaining: "::" is a legal character in file
    names and S3 keys, and `url_to_fs` would read `photos/a::b.jpg` as the chain `a` over `b.jpg`.
    S3 clients get storage.lake.S3_CLIENT_RETRIES unless the options set their own.
    """
    source = os.fspath(source)
    protocol = fsspec.core.split_protocol(source)[0]
    if protocol in (None, "file", "local"):
        return LocalFileSystem(), LocalFileSystem._strip_protocol(source)
    cls = fsspec.get_filesystem_class(protocol)  # what the URL itself says (a host, ?versionId=) first
    options = {**cls._get_kwargs_from_urls(source), **with_client_retries(source, storage_options)}
    return fsspec.filesystem(protocol, **options), cls._strip_protocol(source)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole object. Transient store errors are retried by the client; a 403 is AccessDenied."""
    fs, path = source_filesystem(uri, storage_options)
    try:
        with denied_as(str(uri)):
            return fs.cat_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, "No such object", str(uri)) from e


def sniff_image_format(data: bytes) -> str | None:
    """Format by magic bytes alone (no Pillow), to tell what a file is whatever its name claims."""
    head = bytes(memoryview(data)[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def list_source(
    source: str | os.PathLike, config: SourceConfig = SourceConfig()
) -> Iterator[SourceItem | ListError]:
    """Stream the items of SOURCE: a directory or URL prefix (recursive), a glob, one file, or a manifest.

    Validation happens here, eagerly: a SourceError is raised by this call, not by the first next().
    Directory, prefix and glob listings keep only `config.extensions` and skip hidden names; manifest
    entries and a single named file are taken as given.
    """
    src = os.fspath(source)
    opts = config.storage_options
    scrub = _scrubber(opts)
    try:
        fs, path = source_filesystem(src, opts)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            if not _GLOB_CHARS & set(path):
                raise
            return _glob(fs, path, config, scrub)
        if info["type"] == "directory":
            return _walk(fs, path, _ls(fs, path), config, scrub)
        if path.lower().endswith(MANIFEST_SUFFIXES):
            return _manifest(fs, path, _check_manifest(fs, path), opts, scrub)
        return iter([_item(fs, info)])
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(scrub(f"cannot list {src}: it does not exist")) from None
    except Exception as e:
        local = isinstance(e, PermissionError) and e.filename is not None  # names its path already
        if is_access_denied(e) and not local:  # an object store's 403: permanent, its own one-line message
            raise AccessDenied(errno.EACCES, DENIED, scrub(redact_url(src))) from None
        raise SourceError(scrub(f"cannot list {src}: {_describe(e)}")) from None


# --- directories, prefixes and globs ----------------------------------------------------------------------


def _ls(fs, path: str) -> list[dict]:
    """One directory's listing, fresh: a stale dircache would hide new files from the plan."""
    fs.invalidate_cache(path)
    listing = fs.ls(path, detail=True)
    fs.invalidate_cache(path)  # the cache would otherwise grow into the whole listing
    return listing


def _walk(fs, root, root_listing, config: SourceConfig, scrub, maxdepth=None, match=None):
    """Sorted depth-first walk, one `ls` per directory, listed only when reached.

    Not fsspec's walk: it drops on_error when recursing (a failing subdirectory vanishes silently) and
    reports an S3 directory marker ("dir/") as a file of its own directory.
    """
    stack = [(root, 1, root_listing)]
    while stack:
        path, depth, listing = stack.pop()
        if listing is None:
            try:
                listing = _ls(fs, path)
            except Exception as e:
                yield _error(_qualify(fs, path), e, scrub)
                continue
        subdirs = []
        for info in sorted(listing, key=lambda i: i["name"]):
            name = info["name"]
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith("/") or base.startswith(".") or name.rstrip("/") == path.rstrip("/"):
                continue  # S3 directory marker, hidden name, or the directory itself
            if info["type"] == "directory":
                subdirs.append(name)
                continue
            if posixpath.splitext(base)[1].lower() not in config.extensions or (match and not match(name)):
                continue
            if info.get("islink"):  # local ls reports a symlink's own mtime: stat its target instead
                try:
                    info = fs.info(name)
                except Exception as e:
                    yield _error(_qualify(fs, name), e, scrub)
                    continue
                if info["type"] == "directory":
                    continue  # like os.walk, symlinked directories are not followed (they may form cycles)
            yield _item(fs, info)
        if maxdepth is None or depth < maxdepth:
            stack.extend((d, depth + 1, None) for d in reversed(subdirs))


def _glob(fs, pattern: str, config: SourceConfig, scrub):
    """Walk from the pattern's literal prefix, only as deep as the pattern reaches (`**`: unbounded)."""
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    if not root or fs.info(root)["type"] != "directory":
        raise FileNotFoundError(errno.ENOENT, "glob root is not a directory", root)
    rest = parts[first:]
    maxdepth = None if any("**" in p for p in rest) else len(rest)
    regex = re.compile(glob_translate(pattern))
    return _walk(fs, root, _ls(fs, root), config, scrub, maxdepth, lambda name: regex.match(name) is not None)


# --- manifests ----------------------------------------------------------------------------------------------


def _check_manifest(fs, path: str) -> list[str] | None:
    """Open the manifest once up front so an unreadable or column-less manifest fails before listing."""
    lower = path.lower()
    with fs.open(path, "rb", block_size=_PROBE_BYTES) as f:
        if lower.endswith(".txt"):
            f.read(1)
            return None
        if lower.endswith(".csv"):
            names = [n.strip() for n in next(csv.reader([f.readline().decode("utf-8-sig")]), [])]
        else:
            names = pq.ParquetFile(f).schema_arrow.names
    if "uri" not in names:
        raise SourceError(f"manifest {_qualify(fs, path)} has no 'uri' column (columns: {names})")
    return names


def _manifest(fs, path: str, columns, opts: dict, scrub):
    """Entries in file order; a read failure midway becomes one ListError for the manifest, then stops."""
    rows = _ROWS[posixpath.splitext(path.lower())[1]]
    try:
        for uri, size, version in rows(fs, path, columns):
            yield _entry(fs, posixpath.dirname(path), uri, size, version, opts, scrub)
    except Exception as e:
        yield _error(_qualify(fs, path), e, scrub, "manifest read failed: ")


def _lines(fs, path):
    """Decoded lines, each on its own: one bad byte costs one line, not a whole decoder chunk of them."""
    with fs.open(path, "rb") as f:
        for n, raw in enumerate(f):
            try:
                yield raw.decode("utf-8-sig" if n == 0 else "utf-8")
            except UnicodeDecodeError as e:
                yield e


def _txt_rows(fs, path, _columns):
    for line in _lines(fs, path):
        entry = line if isinstance(line, Exception) else line.strip()
        if entry and not (isinstance(entry, str) and entry.startswith("#")):
            yield entry, None, None


def _csv_rows(fs, path, columns):
    def strict(lines):
        for line in lines:
            if isinstance(line, Exception):
                raise line
            yield line

    reader = csv.reader(strict(_lines(fs, path)))
    next(reader, None)
    for row in reader:
        rec = dict(zip(columns, row, strict=False))  # short rows: missing values
        if any(v.strip() for v in row):
            yield tuple(rec.get(c) for c in _COLUMNS)


def _parquet_rows(fs, path, _columns):
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in _COLUMNS if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols):
            data = batch.to_pydict()
            yield from zip(*(data.get(c, [None] * batch.num_rows) for c in _COLUMNS), strict=True)


_ROWS = {".txt": _txt_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def _entry(mfs, base: str, raw, size, version, opts: dict, scrub) -> SourceItem | ListError:
    """Resolve one manifest entry; stat it only for what the manifest does not say."""
    if isinstance(raw, UnicodeDecodeError):  # an undecodable .txt line
        return _error(raw.object.decode("utf-8", "replace").strip(), raw, scrub)
    uri = "" if raw is None else str(raw).strip()
    try:
        if not uri:
            raise ValueError("manifest row has an empty uri")
        if "://" in uri or "::" in uri:
            fs, path = source_filesystem(uri, opts)
        else:  # a path on the manifest's own filesystem, relative ones against the manifest's directory
            fs = mfs
            joined = posixpath.normpath(posixpath.join(base, uri))
            path = joined if isinstance(fs, LocalFileSystem) else fs._strip_protocol(joined.lstrip("/"))
        uri = _qualify(fs, path)
        size, version = _size(size), _version_value(version)
        if size is not None and version is not None:
            return SourceItem(uri, size, version)
        info = fs.info(path)
        if info["type"] == "directory":
            raise IsADirectoryError(errno.EISDIR, "manifest entry is a directory", uri)
        item = _item(fs, info)
        return SourceItem(
            uri, item.size if size is None else size, item.version if version is None else version
        )
    except Exception as e:
        return _error(uri, e, scrub)


def _size(v) -> int | None:
    if v is None:
        return None
    text = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"size_bytes {v!r} is not a non-negative integer")
    return int(text)


def _version_value(v) -> str | None:
    if isinstance(v, datetime):
        return _iso(v)
    return None if v is None or str(v).strip() == "" else str(v).strip()


# --- items, versions, messages ------------------------------------------------------------------------------


def _item(fs, info: dict) -> SourceItem:
    size = info.get("size")
    return SourceItem(_qualify(fs, info["name"]), None if size is None else int(size), _version(info))


def _qualify(fs, path: str) -> str:
    """Local: the absolute path; remote: protocol://path, exactly what read_bytes takes."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _version(info: dict) -> str | None:
    """S3: the ETag without quotes; elsewhere the modification time as ISO-8601 UTC."""
    etag = info.get("ETag")
    if etag:
        return str(etag).strip('"')
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, tz=timezone.utc).isoformat()
        if isinstance(value, datetime):
            return _iso(value)
        if isinstance(value, str) and value:
            try:
                return _iso(datetime.fromisoformat(value.replace("Z", "+00:00")))
            except ValueError:
                return value
    return None


def _iso(dt: datetime) -> str:
    return (dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)).isoformat()


def _describe(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())  # one line


def _error(uri: str, e: Exception, scrub, prefix: str = "") -> ListError:
    """The uri is left as is (it is the error row's key); the message, one line, is scrubbed."""
    return ListError(uri, type(e).__name__, scrub(prefix + " ".join((str(e) or type(e).__name__).split())))


def _scrubber(opts: dict):
    """A function masking every storage option value (and AWS secrets from the environment) in a text."""
    secrets = {os.environ[k] for k in _SECRET_ENV if os.environ.get(k)} | set(_strings(opts))
    ordered = sorted(secrets, key=len, reverse=True)  # mask "abcdef" before its substring "abc"

    def scrub(text: str) -> str:
        for secret in ordered:
            text = text.replace(secret, "***")
        return text

    return scrub


def _strings(obj) -> list[str]:
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [s for o in obj for s in _strings(o)]
    return [obj] if isinstance(obj, str) and len(obj) >= 3 else []
