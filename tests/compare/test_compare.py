"""`towerflow compare`: the cosine matrix, its files, the heatmap PNG, and one-line errors."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from _support import run_cli, smooth_image
from PIL import Image

import encoders
from tasks.compare import cosine_matrix, display_names, expand_inputs, extreme_pairs
from tasks.heatmap import VIRIDIS_ANCHORS, HeatmapLayout, colormap_table, similarity_heatmap

SIZES = [(120, 200), (300, 90), (64, 64), (150, 150)]  # (h, w) of the distinct images


@pytest.fixture
def run(capsys):
    """run(argv) -> (rc, stdout, stderr lines) through flows.cli.main."""
    return lambda argv: run_cli(argv, capsys)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four distinct images and dup.png, a byte-identical copy of c.png."""
    root = tmp_path_factory.mktemp("compare-corpus")
    for name, (h, w) in zip("abcd", SIZES, strict=True):
        smooth_image(h, w, seed=ord(name)).save(root / f"{name}.png")
    shutil.copyfile(root / "c.png", root / "dup.png")
    (root / "notes.txt").write_text("not an image; directory expansion skips it\n")
    return root


NAMES = ["a.png", "b.png", "c.png", "d.png", "dup.png"]


def _expected_matrix(model: str, weights, paths, pooling=None) -> np.ndarray:
    pooled = encoders.load(model, weights).embed([str(p) for p in paths], pooling).pooled.astype(np.float64)
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return unit @ unit.T


def _expected_png_size(n: int) -> tuple[int, int]:
    lay = HeatmapLayout()
    cell = max(lay.cell_min, min(lay.cell_max, lay.grid_max // n))
    width = lay.margin + cell * (n + 1) + lay.bar_gap + lay.bar_w + lay.bar_label_w + lay.margin
    height = lay.margin + lay.title_h + cell * (n + 1) + lay.margin
    return width, height


def _assert_picture(path, size) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20  # thumbnails + colours, not a blank canvas


def test_compare_matrix_files_and_pairs(run, corpus, checkpoint, tmp_path):
    ckpt = checkpoint("qwen2_5_vl")
    out = tmp_path / "figs" / "heat.png"
    rc, stdout, err = run(
        ["compare", corpus, "--model", "qwen2_5_vl", "--weights", ckpt, "--out", out, "--json"]
    )
    assert (rc, err) == (0, [])
    result = json.loads(stdout)
    assert result["images"] == NAMES

    matrix = np.load(tmp_path / "figs" / "heat.npy")
    assert matrix.dtype == np.float32 and matrix.shape == (5, 5)
    assert np.array_equal(matrix, matrix.T)
    assert np.array_equal(np.diag(matrix), np.ones(5, np.float32))
    expected = _expected_matrix("qwen2_5_vl", ckpt, [corpus / n for n in NAMES])
    np.testing.assert_allclose(matrix, expected, atol=1e-5)

    with open(tmp_path / "figs" / "heat.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", *NAMES]
    assert [r[0] for r in rows[1:]] == NAMES
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=np.float64), matrix, atol=1e-6)

    assert {result["most_similar"]["a"], result["most_similar"]["b"]} == {"c.png", "dup.png"}
    assert result["most_similar"]["score"] == pytest.approx(1.0, abs=1e-5)
    rows_, cols_ = np.triu_indices(5, 1)
    k = int(np.argmin(expected[rows_, cols_]))
    i, j = rows_[k], cols_[k]
    assert {result["least_similar"]["a"], result["least_similar"]["b"]} == {NAMES[i], NAMES[j]}
    assert result["least_similar"]["score"] == pytest.approx(expected[i, j], abs=1e-5)
    assert np.sort(expected[rows_, cols_])[-2] < 0.9999  # the planted duplicate is the only near-1 pair
    _assert_picture(out, _expected_png_size(5))


def test_compare_text_output_dinov2_files_and_dirs(run, corpus, checkpoint, tmp_path):
    """Explicit files plus a directory, DINOv2 with mean pooling: the printed pair is the duplicate."""
    ckpt = checkpoint("dinov2")
    sub = tmp_path / "more"
    sub.mkdir()
    smooth_image(100, 100, seed=99).save(sub / "e.jpg")
    out = tmp_path / "dino.png"
    argv = ["compare", corpus / "a.png", corpus / "c.png", corpus / "dup.png", sub]
    rc, stdout, err = run([*argv, "--model", "dinov2", "--weights", ckpt, "--out", out, "--pooling", "mean"])
    assert (rc, err) == (0, [])
    lines = stdout.splitlines()
    assert lines[0].startswith("compared 4 images with dinov2 (mean pooling, revision ")
    most = lines[1].split()
    assert most[:2] == ["most", "similar:"] and most[3] == "<->"
    assert {most[2], most[4]} == {f"{corpus.name}/c.png", f"{corpus.name}/dup.png"}
    assert float(most[5]) == pytest.approx(1.0, abs=1e-4)
    paths = [corpus / "a.png", corpus / "c.png", corpus / "dup.png", sub / "e.jpg"]
    expected = _expected_matrix("dinov2", ckpt, paths, "mean")
    np.testing.assert_allclose(np.load(tmp_path / "dino.npy"), expected, atol=1e-5)
    least = lines[2].split()
    scores = {(a, b): expected[a, b] for a in range(4) for b in range(a + 1, 4)}
    assert float(least[-1]) == pytest.approx(min(scores.values()), abs=1e-4)
    assert lines[3] == f"wrote {out}, {tmp_path / 'dino.npy'}, {tmp_path / 'dino.csv'}"
    _assert_picture(out, _expected_png_size(4))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{a}"], "compare needs at least 2 images, got 1"),
        (["{a}", "{missing}"], "No such image file or directory: {missing}"),
        (["{a}", "{bad}"], "cannot read image {bad}: not_an_image"),
        (["{a}", "{empty}"], "{empty}: no image files"),
        (["{a}", "{c}", "--model", "nosuch"], "unknown encoder 'nosuch'"),
        (["{a}", "{c}", "--pooling", "cls"], "qwen2_5_vl has no CLS token"),
        (["{a}", "{c}", "--out", "{tmp}/heat.jpg"], "--out must name a .png file"),
        (["{a}", "{c}", "--weights", "{tmp}/no-weights"], "no such directory"),
    ],
)
def test_compare_bad_arguments_exit_2_with_one_line(argv, message, run, corpus, checkpoint, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is no PNG at all")
    (tmp_path / "empty").mkdir()
    names = {"a": corpus / "a.png", "c": corpus / "c.png", "missing": tmp_path / "gone.png",
             "bad": tmp_path / "bad.png", "empty": tmp_path / "empty", "tmp": tmp_path}  # fmt: skip
    fill = lambda s: s.format(**names)  # noqa: E731
    weights = str(checkpoint("qwen2_5_vl"))
    defaults = {"--model": "qwen2_5_vl", "--weights": weights, "--out": str(tmp_path / "h.png")}
    args = [fill(a) for a in argv]
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    rc, stdout, err = run(["compare", *args])
    assert rc == 2 and stdout == ""
    assert len(err) == 1 and err[0].startswith("towerflow: error: ") and fill(message) in err[0]
    assert not any(tmp_path.glob("h.*"))  # nothing written


def test_cosine_matrix_and_pairs_on_known_vectors():
    v = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]], np.float32)
    m = cosine_matrix(v)
    r = -(0.5**0.5)
    expected = np.array([[1, 1, 0, r], [1, 1, 0, r], [0, 0, 1, r], [r, r, r, 1]])
    np.testing.assert_allclose(m, expected, atol=1e-7)
    assert m.dtype == np.float32 and np.array_equal(m, m.T)
    most, least = extreme_pairs(m)
    assert (most.i, most.j, round(most.score, 6)) == (0, 1, 1.0)
    assert (least.i, least.j) == (0, 3) and least.score == pytest.approx(-(0.5**0.5))
    zero = cosine_matrix(np.array([[0.0, 0.0], [1.0, 0.0]]))
    np.testing.assert_array_equal(zero, [[1, 0], [0, 1]])


def test_expand_inputs_and_names(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        for name in ("b.PNG", "a.jpg", "skip.txt"):
            (tmp_path / d / name).write_bytes(b"")
    paths = expand_inputs([str(tmp_path / "y"), str(tmp_path / "x" / "b.PNG")])
    assert paths == [str(tmp_path / rel) for rel in ("y/a.jpg", "y/b.PNG", "x/b.PNG")]
    assert display_names(paths) == ["y/a.jpg", "y/b.PNG", "x/b.PNG"]
    mixed = [str(tmp_path / "x" / "a.jpg"), "s3://bucket/k.png"]
    assert display_names(mixed) == ["a.jpg", "s3://bucket/k.png"]


def test_large_set_heatmap_has_the_layout_size_and_no_cell_text():
    n = 40
    rng = np.random.default_rng(0)
    m = cosine_matrix(rng.normal(size=(n, 8)))
    thumbs = [smooth_image(30 + i, 50, seed=i) for i in range(n)]
    pic = similarity_heatmap(m, thumbs, "forty")
    assert pic.size == _expected_png_size(n) == (12 + 25 * 41 + 14 + 16 + 44 + 12, 12 + 20 + 25 * 41 + 12)
    lay = HeatmapLayout()
    x0, y0 = lay.margin + 25, lay.margin + lay.title_h + 25
    cell = np.asarray(pic)[y0 + 25 * 3 : y0 + 25 * 4, x0 + 25 * 5 : x0 + 25 * 6]
    assert len(np.unique(cell.reshape(-1, 3), axis=0)) == 1  # a flat colour: no score written at 25 px


def test_colormap_is_perceptually_ordered():
    table = colormap_table()
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert tuple(table[0]) == tuple(VIRIDIS_ANCHORS[0]) and tuple(table[-1]) == tuple(VIRIDIS_ANCHORS[-1])
    c = table / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lightness = 116 * np.cbrt(linear @ [0.2126, 0.7152, 0.0722]) - 16  # CIE L* (all values above 0.9)
    assert lightness[0] == pytest.approx(14.9, abs=0.1) and lightness[-1] == pytest.approx(90.9, abs=0.1)
    assert np.all(np.diff(lightness[::8]) > 0.5)  # rises steadily ...
    assert np.all(np.diff(lightness) > -0.05)  # ... and uint8 rounding never makes it visibly dip
