"""`towerflow bench --quick` runs and reports every figure (its speed is measured, not asserted)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from flows.cli import main
from tasks.bench import make_photos

pytestmark = pytest.mark.slow


def test_photo_corpus_is_photo_sized(tmp_path):
    paths = make_photos(tmp_path, 6, seed=1)
    sizes = [Image.open(p).size for p in paths]
    assert all(300 <= max(s) <= 1600 for s in sizes) and len({s[0] / s[1] for s in sizes}) >= 4
    assert all(p.stat().st_size > 10_000 for p in paths)  # noise and shapes: not a trivially small JPEG


@pytest.mark.usefixtures("ray_local", "prefect_harness")
def test_quick_bench_reports_every_figure(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    base, run, ratios = result["baseline"], result["runs"][0], result["ratios"]
    assert base["ceiling_images_per_s"] > 0 and base["ceiling_tokens_per_s"] > 0
    # the ceiling: the better of the bare forward in one process and in the actors' own layout
    layout = base["ceiling_layout_images_per_s"]
    assert base["ceiling_images_per_s"] == max(base["ceiling_in_process_images_per_s"], layout or 0)
    assert base["batch_tokens"] == 2048 and base["forwards"] >= 48 // 7  # the CPU's budget: 7 images
    assert base["naive_images_per_s"] > 0 and base["gflops_per_image"] > 1  # dinov2-small: ~11 GFLOP
    assert run["embedded"] == 48 and run["errors"] == 0
    assert run["steady_images_per_s"] > 0 and run["span_images_per_s"] > 0 and run["first_row_s"] > 0
    assert set(run["ms_per_image"]) == {"read", "decode", "preprocess", "forward", "write", "commit"}
    assert all(v > 0 for v in run["ms_per_image"].values())
    assert run["driver_rss_mb"] > 100 and run["worker_rss_max_mb"] > 100
    assert ratios["e2e_vs_ceiling"] > 0 and ratios["e2e_vs_naive"] > 0
    # the run's ceiling is the higher of the bare forwards measured just before and just after it
    assert run["ceiling_images_per_s"] >= base["ceiling_images_per_s"]
    assert ratios["e2e_vs_ceiling"] == run["steady_images_per_s"] / run["ceiling_images_per_s"]
    table = (tmp_path / "bench.md").read_text()
    assert "x** the ceiling" in table and "GFLOP/image" in table and table in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--batch-tokens", "0"], ["--batch-images", "0"], ["--images", "1"]])
def test_bad_bench_arguments_exit_2_before_any_work(args, tmp_path, capsys):
    assert main(["bench", *args, "--out", str(tmp_path / "out")]) == 2
    assert "batch sizes positive" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
