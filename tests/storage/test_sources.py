"""storage.sources: listing local trees, globs, URLs, manifests and S3 (moto) as versioned items."""

import csv
import inspect
import io
import os
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from storage.sources import (
    IMAGE_EXTENSIONS,
    ListError,
    SourceConfig,
    SourceError,
    SourceItem,
    list_source,
    read_bytes,
    sniff_image_format,
    source_filesystem,
)

MTIME = datetime(2026, 11, 26, 14, 0, 0, 123456, tzinfo=timezone.utc)
MTIME_ISO = "2026-11-26T14:00:00.123456+00:00"
SECRET = "S3CRET-do-not-log-42"


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    ns = int(MTIME.timestamp()) * 10**9 + MTIME.microsecond * 1000
    os.utime(path, ns=(ns, ns))
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/ with nested dirs, mixed-case extensions, non-images and hidden names."""
    root = tmp_path / "root"
    for rel, size in [
        ("a.jpg", 3), ("B.JPG", 5), ("c.PnG", 7), ("z.bmp", 1), ("notes.txt", 2), ("table.csv", 2),
        (".hidden.jpg", 1), (".cache/x.jpg", 1), ("sub/d.webp", 11), ("sub/f.gif", 13),
        ("sub/deeper/e.tiff", 17), ("sub/deeper/g.jpeg.bak", 1),
    ]:  # fmt: skip
        write(root / rel, b"x" * size)
    return root


EXPECTED = ["B.JPG", "a.jpg", "c.PnG", "z.bmp", "sub/d.webp", "sub/f.gif", "sub/deeper/e.tiff"]


# --- local sources --------------------------------------------------------------------------------------


def test_local_directory_recursive_sorted_filtered(tree):
    listing = list_source(tree)
    assert inspect.isgenerator(listing)
    got = list(listing)
    assert got == [SourceItem(str(tree / r), (tree / r).stat().st_size, MTIME_ISO) for r in EXPECTED]
    assert [i.size for i in got] == [5, 3, 7, 1, 11, 13, 17]


def test_local_directory_accepts_str_and_custom_extensions(tree):
    got = list(list_source(str(tree), SourceConfig(extensions=frozenset({"JPG", ".Gif"}))))
    assert [i.uri for i in got] == [str(tree / r) for r in ("B.JPG", "a.jpg", "sub/f.gif")]
    with pytest.raises(TypeError):
        SourceConfig(extensions=".jpg")


def test_file_url_gives_plain_absolute_paths(tree):
    assert list(list_source(f"file://{tree}")) == list(list_source(tree))


def test_single_file_is_taken_as_given(tree):
    assert list(list_source(tree / "sub" / "d.webp")) == [SourceItem(str(tree / "sub/d.webp"), 11, MTIME_ISO)]
    write(tree / "raw.dat", b"abc")
    assert list(list_source(tree / "raw.dat")) == [SourceItem(str(tree / "raw.dat"), 3, MTIME_ISO)]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*.jpg", ["a.jpg"]),  # glob is case-sensitive; the extension filter is not
        ("*/*.gif", ["sub/f.gif"]),
        ("sub/**/*", ["sub/d.webp", "sub/f.gif", "sub/deeper/e.tiff"]),
        ("**/*.tiff", ["sub/deeper/e.tiff"]),
        ("s?b/[de]*", ["sub/d.webp"]),
        ("*.nothing", []),
    ],
)
def test_local_glob(tree, pattern, expected):
    assert [i.uri for i in list_source(f"{tree}/{pattern}")] == [str(tree / r) for r in expected]


def test_missing_source_raises_before_iteration(tmp_path):
    for missing in (tmp_path / "nope", f"{tmp_path}/nope/*.jpg", f"file://{tmp_path}/nope"):
        with pytest.raises(SourceError) as exc:
            list_source(missing)  # the call itself raises: nothing was ever yielded
        assert "nope" in str(exc.value) and "\n" not in str(exc.value)


def test_unreadable_root_is_source_error_unreadable_subdir_is_list_error(tree, monkeypatch):
    real_ls = LocalFileSystem.ls

    def ls(self, path, detail=True, **kw):
        if path.rstrip("/") in (str(tree / "sub"), str(tree / "denied")):
            raise PermissionError(13, "Permission denied", path)
        return real_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    got = list(list_source(tree))
    assert got[-1] == ListError(str(tree / "sub"), "PermissionError", got[-1].message)
    assert [i.uri for i in got[:-1]] == [str(tree / r) for r in EXPECTED[:4]]
    (tree / "denied").mkdir()
    with pytest.raises(SourceError, match="PermissionError"):
        list_source(tree / "denied")


def test_symlinks_report_their_target_and_directories_are_not_followed(tree):
    (tree / "link.jpg").symlink_to(tree / "sub" / "d.webp")
    os.utime(tree / "link.jpg", (0, 0), follow_symlinks=False)  # the link's own mtime must not be used
    (tree / "broken.jpg").symlink_to(tree / "nowhere.jpg")
    (tree / "loop").symlink_to(tree)  # a cycle, if it were followed
    got = list(list_source(tree))
    assert got[2] == ListError(str(tree / "broken.jpg"), "FileNotFoundError", got[2].message)
    assert got[4] == SourceItem(str(tree / "link.jpg"), 11, MTIME_ISO)
    assert [i.uri for i in got[:2] + got[3:4] + got[5:]] == [str(tree / r) for r in EXPECTED]


def test_existing_path_with_glob_characters_is_literal(tree):
    write(tree.parent / "set[1]" / "a.jpg", b"1")
    assert [i.uri for i in list_source(tree.parent / "set[1]")] == [str(tree.parent / "set[1]" / "a.jpg")]


def test_listing_streams_directory_by_directory(tmp_path, monkeypatch):
    """The first item arrives after two `ls` calls (root + first subdir), not after listing all 900 files."""
    for d in range(3):
        for n in range(300):
            (tmp_path / f"d{d}").mkdir(exist_ok=True)
            (tmp_path / f"d{d}" / f"{n:03d}.jpg").touch()
    calls = []
    real_ls = LocalFileSystem.ls

    def ls(self, path, detail=True, **kw):
        calls.append(path)
        return real_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    listing = list_source(tmp_path)
    first = next(listing)
    assert first.uri == str(tmp_path / "d0" / "000.jpg")
    assert calls == [str(tmp_path), str(tmp_path / "d0")]
    assert len(list(listing)) == 899 and len(calls) == 4


def test_memory_url_and_read_bytes():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/tfmem/a/x.jpg": b"abc", "/tfmem/a/b/y.png": b"defg", "/tfmem/a/b/z.txt": b"no"})
    try:
        got = list(list_source("memory://tfmem/a"))
        assert [(i.uri, i.size) for i in got] == [
            ("memory:///tfmem/a/x.jpg", 3),
            ("memory:///tfmem/a/b/y.png", 4),
        ]
        assert all(datetime.fromisoformat(i.version).tzinfo == timezone.utc for i in got)
        assert [read_bytes(i.uri) for i in got] == [b"abc", b"defg"]
    finally:
        fs.rm("/tfmem", recursive=True)


def test_read_bytes_local_and_missing(tree):
    assert read_bytes(str(tree / "sub/d.webp")) == b"x" * 11
    assert read_bytes(f"file://{tree}/a.jpg") == b"xxx"
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        read_bytes(str(tree / "gone.jpg"))


def test_double_colon_in_a_name_is_a_name_not_an_fsspec_chain(tmp_path):
    """'::' is fsspec's URL-chaining separator but a legal character in file names and S3 keys."""
    (tmp_path / "a::b.jpg").write_bytes(b"colon")
    assert [i.uri for i in list_source(tmp_path)] == [str(tmp_path / "a::b.jpg")]
    assert read_bytes(str(tmp_path / "a::b.jpg")) == read_bytes(f"file://{tmp_path}/a::b.jpg") == b"colon"


# --- manifests ------------------------------------------------------------------------------------------


def test_txt_manifest_resolves_relative_entries(tree):
    lines = [
        "# a comment",
        "",
        "../root/a.jpg",
        f"  {tree}/sub/d.webp  ",
        f"file://{tree}/z.bmp",
        "missing.jpg",
    ]
    lines += ["../root/notes.txt", "../root/sub"]
    manifest = write(tree.parent / "lists" / "m.txt", "\n".join(lines).encode())
    got = list(list_source(manifest))
    assert got[:4] == [
        SourceItem(str(tree / "a.jpg"), 3, MTIME_ISO),
        SourceItem(str(tree / "sub/d.webp"), 11, MTIME_ISO),
        SourceItem(str(tree / "z.bmp"), 1, MTIME_ISO),
        ListError(str(tree.parent / "lists/missing.jpg"), "FileNotFoundError", got[3].message),
    ]
    assert got[4] == SourceItem(str(tree / "notes.txt"), 2, MTIME_ISO)  # named by the user: kept
    assert got[5].error_type == "IsADirectoryError" and len(got) == 6


def test_undecodable_manifest_lines(tree):
    """.txt: a bad line is one ListError and listing goes on; .csv: rows up to it, then one ListError."""
    body = b"root/a.jpg\n" * 5000 + b"root/\xff\xfe.jpg\n" + b"root/z.bmp\n"
    txt = write(tree.parent / "m.txt", body)
    got = list(list_source(txt))
    assert got[:5000] == [SourceItem(str(tree / "a.jpg"), 3, MTIME_ISO)] * 5000
    assert got[5000] == ListError("root/\ufffd\ufffd.jpg", "UnicodeDecodeError", got[5000].message)
    assert got[5001:] == [SourceItem(str(tree / "z.bmp"), 1, MTIME_ISO)]
    csv_path = write(tree.parent / "m.csv", b"uri\n" + body)
    got = list(list_source(csv_path))
    assert got[:-1] == [SourceItem(str(tree / "a.jpg"), 3, MTIME_ISO)] * 5000
    assert got[-1] == ListError(str(csv_path), "UnicodeDecodeError", got[-1].message)
    assert got[-1].message.startswith("manifest read failed")


def test_csv_manifest_with_and_without_size_columns(tree):
    path = tree.parent / "m.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "size_bytes", "source_version"])
        w.writerow(["root/a.jpg", "", ""])  # looked up
        w.writerow(["root/not-there.jpg", "99", "v1"])  # taken as given: no lookup
        w.writerow(["root/B.JPG", "5", ""])  # only the version looked up
        w.writerow(["root/missing.jpg", "", ""])
        w.writerow(["root/c.PnG", "seven", ""])
        w.writerow(["", "", ""])  # blank row: skipped
    got = list(list_source(path))
    assert got[:3] == [
        SourceItem(str(tree / "a.jpg"), 3, MTIME_ISO),
        SourceItem(str(tree / "not-there.jpg"), 99, "v1"),
        SourceItem(str(tree / "B.JPG"), 5, MTIME_ISO),
    ]
    assert [(e.uri, e.error_type) for e in got[3:]] == [
        (str(tree / "missing.jpg"), "FileNotFoundError"),
        (str(tree / "c.PnG"), "ValueError"),
    ]
    path.write_text("uri\nroot/a.jpg\n")
    assert list(list_source(path)) == [SourceItem(str(tree / "a.jpg"), 3, MTIME_ISO)]
    path.write_text("path,size\nroot/a.jpg,3\n")
    with pytest.raises(SourceError, match="uri"):
        list_source(path)


def test_parquet_manifest_with_and_without_size_columns(tree):
    path = tree.parent / "m.parquet"
    table = pa.table(
        {
            "uri": ["root/a.jpg", "root/not-there.jpg", "root/missing.jpg", f"{tree}/sub/f.gif"],
            "size_bytes": pa.array([None, 42, None, None], pa.int64()),
            "source_version": [None, "etag-1", None, None],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    got = list(list_source(path))
    assert got[:2] == [
        SourceItem(str(tree / "a.jpg"), 3, MTIME_ISO),
        SourceItem(str(tree / "not-there.jpg"), 42, "etag-1"),
    ]
    assert (got[2].uri, got[2].error_type) == (str(tree / "missing.jpg"), "FileNotFoundError")
    assert got[3] == SourceItem(str(tree / "sub/f.gif"), 13, MTIME_ISO)
    pq.write_table(pa.table({"uri": ["root/c.PnG"]}), path)
    assert list(list_source(path)) == [SourceItem(str(tree / "c.PnG"), 7, MTIME_ISO)]
    pq.write_table(pa.table({"path": ["root/c.PnG"]}), path)
    with pytest.raises(SourceError, match="uri"):
        list_source(path)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="m.parquet"):
        list_source(path)


# --- S3 (moto) --------------------------------------------------------------------------------------------


@pytest.fixture
def s3_tree(s3):
    """Objects under pre/, a hidden one, directory markers (one named like an image) and one outside pre/."""
    import boto3

    bucket, options = s3
    fs = fsspec.filesystem("s3", **options)
    fs.pipe({f"{bucket}/pre/a.jpg": b"a" * 3, f"{bucket}/pre/sub/b.PNG": b"b" * 4,
             f"{bucket}/pre/sub/deep/c.gif": b"c" * 5, f"{bucket}/pre/notes.txt": b"n",
             f"{bucket}/pre/.hidden.jpg": b"h", f"{bucket}/other/x.jpg": b"x"})  # fmt: skip
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1")
    for marker in ("pre/", "pre/sub/", "pre/empty/", "pre/odd.jpg/"):
        client.put_object(Bucket=bucket, Key=marker, Body=b"")
    etags = {k: client.head_object(Bucket=bucket, Key=k)["ETag"].strip('"') for k in
             ("pre/a.jpg", "pre/sub/b.PNG", "pre/sub/deep/c.gif")}  # fmt: skip
    return bucket, options, etags


def test_s3_prefix_recursive_with_etags(s3_tree):
    bucket, options, etags = s3_tree
    got = list(list_source(f"s3://{bucket}/pre", SourceConfig(storage_options=options)))
    assert got == [
        SourceItem(f"s3://{bucket}/{k}", size, etags[k])
        for k, size in [("pre/a.jpg", 3), ("pre/sub/b.PNG", 4), ("pre/sub/deep/c.gif", 5)]
    ]
    assert all(len(i.version) == 32 and '"' not in i.version for i in got)
    assert [read_bytes(i.uri, options) for i in got] == [b"aaa", b"bbbb", b"ccccc"]
    with pytest.raises(FileNotFoundError, match="nothing.jpg"):
        read_bytes(f"s3://{bucket}/pre/nothing.jpg", options)
    # a trailing slash and the bucket root list the same objects (plus other/ for the root)
    assert list(list_source(f"s3://{bucket}/pre/", SourceConfig(storage_options=options))) == got
    root = list(list_source(f"s3://{bucket}", SourceConfig(storage_options=options)))
    assert [i.uri for i in root] == [f"s3://{bucket}/other/x.jpg"] + [i.uri for i in got]


def test_s3_glob_and_single_object(s3_tree):
    bucket, options, etags = s3_tree
    cfg = SourceConfig(storage_options=options)
    assert [i.uri for i in list_source(f"s3://{bucket}/pre/**/*.gif", cfg)] == [
        f"s3://{bucket}/pre/sub/deep/c.gif"
    ]
    assert [i.uri for i in list_source(f"s3://{bucket}/*/*.jpg", cfg)] == [
        f"s3://{bucket}/other/x.jpg",
        f"s3://{bucket}/pre/a.jpg",
    ]
    assert list(list_source(f"s3://{bucket}/pre/sub/b.PNG", cfg)) == [
        SourceItem(f"s3://{bucket}/pre/sub/b.PNG", 4, etags["pre/sub/b.PNG"])
    ]


def test_s3_key_with_double_colon(s3):
    bucket, options = s3
    fsspec.filesystem("s3", **options).pipe({f"{bucket}/c/user::7/x::y.jpg": b"s3colon"})
    got = list(list_source(f"s3://{bucket}/c", SourceConfig(storage_options=options)))
    assert [i.uri for i in got] == [f"s3://{bucket}/c/user::7/x::y.jpg"]
    assert read_bytes(got[0].uri, options) == b"s3colon"


def test_what_the_url_says_reaches_the_filesystem(s3):
    """A URL's own options (s3fs: ?versionId= means a version-aware client) are kept beside the user's."""
    bucket, options = s3
    fs, path = source_filesystem(f"s3://{bucket}/k.jpg?versionId=abc", options)
    assert fs.version_aware and path == f"{bucket}/k.jpg?versionId=abc"
    assert not source_filesystem(f"s3://{bucket}/k.jpg", options)[0].version_aware


def test_s3_txt_manifest_lists_s3_objects(s3_tree):
    bucket, options, etags = s3_tree
    fs = fsspec.filesystem("s3", **options)
    lines = ["../pre/a.jpg", f"s3://{bucket}/pre/sub/b.PNG", f"/{bucket}/pre/sub/deep/c.gif", "missing.jpg"]
    fs.pipe(f"{bucket}/lists/m.txt", "\n".join(lines).encode())
    got = list(list_source(f"s3://{bucket}/lists/m.txt", SourceConfig(storage_options=options)))
    assert got[:3] == [
        SourceItem(f"s3://{bucket}/{k}", size, etags[k])
        for k, size in [("pre/a.jpg", 3), ("pre/sub/b.PNG", 4), ("pre/sub/deep/c.gif", 5)]
    ]
    assert (got[3].uri, got[3].error_type) == (f"s3://{bucket}/lists/missing.jpg", "FileNotFoundError")


def test_s3_missing_prefix_or_bucket_is_source_error(s3):
    bucket, options = s3
    for src in (f"s3://{bucket}/nothing-here", "s3://tf-no-such-bucket/x", f"s3://{bucket}/nothing/*.jpg"):
        with pytest.raises(SourceError, match="does not exist"):
            list_source(src, SourceConfig(storage_options=options))


def test_credentials_never_in_messages(s3_tree, tmp_path):
    """botocore echoes a bad region back in its error; key, secret and endpoint must not leak either."""
    bucket, options, _ = s3_tree
    leaky = {
        **options,
        "key": "AKIA" + SECRET,
        "secret": SECRET,
        "client_kwargs": {"region_name": f"x {SECRET}"},
    }
    cfg = SourceConfig(storage_options=leaky)
    assert SECRET not in repr(cfg)
    with pytest.raises(SourceError) as exc:
        list_source(f"s3://{bucket}/pre", cfg)
    assert "InvalidRegionError" in str(exc.value)
    assert SECRET not in str(exc.value) and options["endpoint_url"] not in str(exc.value)
    manifest = write(tmp_path / "m.txt", f"s3://{bucket}/pre/a.jpg\n".encode())
    [err] = list(list_source(manifest, cfg))
    assert isinstance(err, ListError) and err.uri == f"s3://{bucket}/pre/a.jpg"
    assert err.error_type == "InvalidRegionError" and SECRET not in err.message and "***" in err.message
    with pytest.raises(SourceError) as exc:
        list_source("s3://tf-no-such-bucket/x", SourceConfig(storage_options={**options, "secret": SECRET}))
    assert SECRET not in str(exc.value) and options["endpoint_url"] not in str(exc.value)


# --- magic bytes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_sniff_image_format(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, fmt)
    assert sniff_image_format(buf.getvalue()) == fmt
    assert sniff_image_format(buf.getvalue()[:12]) == fmt


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x89PN", b"RIFF\x00\x00\x00\x00WAVE", b"<svg/>"])
def test_sniff_rejects_non_images(data):
    assert sniff_image_format(data) is None


def test_constants():
    assert ".jpg" in IMAGE_EXTENSIONS and all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
