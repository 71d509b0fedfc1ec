"""`towerflow tokens`: token counts without a model, and the token-grid heatmap of one image."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _support import run_cli, smooth_image
from PIL import Image

import encoders
from tasks.compare import token_region
from tasks.heatmap import OverlayLayout


@pytest.fixture
def run(capsys):
    """run(argv) -> (rc, stdout, stderr lines) through flows.cli.main."""
    return lambda argv: run_cli(argv, capsys)


@pytest.mark.parametrize("model", ["qwen2_5_vl", "dinov2"])
def test_count_matches_what_embedding_yields(model, run, checkpoint):
    ckpt = checkpoint(model)
    enc = encoders.load(model, ckpt)
    for width, height in [(200, 120), (90, 300), (640, 48), (57, 57)]:
        rc, stdout, err = run(
            ["tokens", "--count", f"{width}x{height}", "--model", model, "--weights", ckpt, "--json"]
        )
        assert (rc, err) == (0, [])
        got = json.loads(stdout)
        res = enc.embed([smooth_image(height, width, seed=width)])
        assert got["tokens"] == len(res.patches[0]) == enc.num_tokens(height, width)
        assert tuple(got["grid"]) == tuple(res.grids[0])
        assert got["preprocessing"] == "checkpoint" and got["size"] == [width, height]
        assert got["merged"] is (model == "qwen2_5_vl")


def test_count_text_states_what_is_counted(run, checkpoint):
    rc, stdout, _ = run(
        ["tokens", "--count", "200x120", "--model", "qwen2_5_vl", "--weights", checkpoint("qwen2_5_vl")]
    )
    assert rc == 0
    lines = dict(line.split(":", 1) for line in stdout.splitlines())
    n = encoders.load_preprocessor("qwen2_5_vl", checkpoint("qwen2_5_vl")).num_tokens(120, 200)
    assert lines["tokens"].split()[:3] == [str(n), "merged", "tokens"]
    assert f"{4 * n} patches before the merger" in lines["tokens"]
    rc, stdout, _ = run(
        ["tokens", "--count", "200x120", "--model", "dinov2", "--weights", checkpoint("dinov2")]
    )
    lines = dict(line.split(":", 1) for line in stdout.splitlines())
    assert lines["tokens"].strip() == "256 patch tokens (14 px patches; CLS not counted)"
    assert lines["grid"].strip() == "16 x 16 tokens (h x w)" and lines["model input"].strip() == "224x224"


def test_count_without_weights_uses_the_released_preprocessing(run, checkpoint, tmp_path):
    # A checkpoint without preprocessor_config.json falls back to the released model's preprocessing.
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint("qwen2_5_vl"), bare)
    (bare / "preprocessor_config.json").unlink()
    released = encoders.load_preprocessor("qwen2_5_vl", bare)
    rc, stdout, err = run(["tokens", "--count", "1920x1080", "--model", "qwen2_5_vl", "--json"])
    assert (rc, err) == (0, [])
    got = json.loads(stdout)
    assert got["tokens"] == released.num_tokens(1080, 1920) == 39 * 69  # smart resize: 1092 x 1932 px
    assert got["grid"] == [39, 69] and got["input_size"] == [1932, 1092] and got["patches"] == 4 * 2691
    assert got["preprocessing"] == "released default"
    prepared = released.preprocess_image(Image.new("RGB", (1920, 1080)))
    assert prepared.grid_thw == (1, 78, 138)
    tiny = encoders.load_preprocessor("qwen2_5_vl", checkpoint("qwen2_5_vl")).num_tokens(1080, 1920)
    assert tiny != got["tokens"]  # the tiny checkpoint's own max_pixels would give another answer

    rc, stdout, _ = run(["tokens", "--count", "1920x1080", "--model", "dinov2", "--json"])
    assert json.loads(stdout)["tokens"] == 256 and json.loads(stdout)["grid"] == [16, 16]
    rc, stdout, _ = run(["tokens", "--count", "1920x1080", "--model", "dual", "--json"])
    assert json.loads(stdout)["tokens"] == 2691  # dual's patch tokens are its Qwen tower's


def _expected_overlay_size(width: int, height: int) -> tuple[int, int]:
    lay = OverlayLayout()
    scale = lay.display / max(width, height)
    w, h = round(width * scale), round(height * scale)
    return max(w, lay.min_width), h + lay.caption_h


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "wide.png"
    smooth_image(120, 200, seed=5).save(path)
    return path


def test_norm_heatmap_over_qwen_tokens(run, checkpoint, picture, tmp_path):
    ckpt = checkpoint("qwen2_5_vl")
    out = tmp_path / "tok.png"
    rc, stdout, err = run(
        ["tokens", picture, "--model", "qwen2_5_vl", "--weights", ckpt, "--out", out, "--json"]
    )
    assert (rc, err) == (0, [])
    got = json.loads(stdout)
    res = encoders.load("qwen2_5_vl", ckpt).embed([picture])
    norms = np.linalg.norm(res.patches[0].astype(np.float64), axis=1)
    assert got["grid"] == list(res.grids[0]) and got["tokens"] == len(res.patches[0])
    assert got["mode"] == "norm" and got["token"] is None
    assert (got["min"], got["max"]) == pytest.approx((norms.min(), norms.max()), rel=1e-6)
    with Image.open(out) as im:
        assert im.size == _expected_overlay_size(200, 120) == (512, 307 + 40)
        shown = np.asarray(im.convert("RGB"))[:307].astype(int)
    plain = np.asarray(Image.open(picture).resize((512, 307), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(shown - plain).mean() > 10  # the heatmap is blended over the whole image
    assert len(np.unique(shown.reshape(-1, 3), axis=0)) > 100


def test_similarity_heatmap_dims_what_dinov2_crops_away(run, checkpoint, picture, tmp_path):
    ckpt = checkpoint("dinov2")
    out = tmp_path / "sim.png"
    argv = ["tokens", picture, "--model", "dinov2", "--weights", ckpt, "--out", out, "--token", "2,3"]
    rc, stdout, err = run(argv)
    assert (rc, err) == (0, [])
    assert stdout.startswith(f"wrote {out}: 16 x 16 tokens (h x w), cosine similarity to token 2,3, range ")
    assert float(stdout.split()[-1]) == pytest.approx(1.0, abs=1e-5)  # the token itself
    enc = encoders.load("dinov2", ckpt)
    # shortest edge 120 -> 256, centre crop 224: 105 x 105 source pixels in the middle
    assert token_region(enc, 200, 120) == pytest.approx((47.5, 7.5, 152.5, 112.5))
    with Image.open(out) as im:
        assert im.size == (512, 347)
        shown = np.asarray(im.convert("RGB")).astype(int)
    plain = np.asarray(Image.open(picture).resize((512, 307), Image.Resampling.BILINEAR)).astype(int)
    dimmed = (plain * OverlayLayout().outside_dim).astype(int)
    np.testing.assert_array_equal(shown[:300, :110], dimmed[:300, :110])  # left of the crop: dimmed only
    assert np.abs(shown[40:260, 140:370] - plain[40:260, 140:370]).mean() > 10  # inside: heatmap


DINO = ["--model", "dinov2", "--weights", "{dino}", "--out", "{out}"]  # + an image: a valid command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "19x", "--model", "dinov2"], "expected an image size WIDTHxHEIGHT, such as 1920x1080"),
        (["--count", "0x10", "--model", "dinov2"], "got '0x10'"),
        (["--count", "1920x1080x3", "--model", "qwen2_5_vl"], "got '1920x1080x3'"),
        (["--count", "100000x100000", "--model", "qwen2_5_vl"], "over the decoder's limit"),
        (["--count", "64x64", "--model", "nosuch"], "unknown encoder 'nosuch'"),
        (["--count", "64x64", "--model", "dinov2", "--out", "x.png"], "--count prints a count only"),
        (["{missing}", *DINO], "No such image file: {missing}"),
        (["{pic}", *DINO, "--model", "nosuch"], "unknown encoder 'nosuch'"),
        (["{pic}", "--model", "dinov2", "--out", "{out}"], "tokens needs --weights"),
        (["{pic}", "--model", "dinov2", "--weights", "{dino}"], "tokens needs --out"),
        (["{pic}", *DINO, "--token", "16,0"], "token 16,0 is outside the 16 x 16 token grid"),
        (["{pic}", *DINO, "--token", "a,b"], "--token expects ROW,COL"),
        (
            ["{pic}", *DINO, "--token", "1,1", "--mode", "norm"],
            "--token picks the reference of --mode similarity",
        ),
    ],
)
def test_tokens_bad_arguments_exit_2_with_one_line(argv, message, run, checkpoint, picture, tmp_path):
    out, dino = tmp_path / "o.png", checkpoint("dinov2")
    names = {"missing": tmp_path / "gone.png", "pic": picture, "dino": dino, "out": out}
    fill = lambda s: s.format(**names)  # noqa: E731
    rc, stdout, err = run(["tokens", *(fill(a) for a in argv)])
    assert rc == 2 and stdout == ""
    assert len(err) == 1 and err[0].startswith("towerflow: error: ") and fill(message) in err[0]
    assert not out.exists()
