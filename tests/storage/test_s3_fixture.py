"""The S3 fixture itself: real s3fs round trip against moto's server."""

import fsspec


def test_s3_round_trip(s3):
    bucket, options = s3
    fs = fsspec.filesystem("s3", **options)
    fs.pipe(f"{bucket}/a/b.bin", b"hello")
    assert fs.cat(f"{bucket}/a/b.bin") == b"hello"
    assert fs.ls(f"{bucket}/a", detail=False) == [f"{bucket}/a/b.bin"]
