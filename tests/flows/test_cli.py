"""The `towerflow` CLI: listing, tiny checkpoints, the demo, and one-line errors for user mistakes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import encoders
from flows.cli import main
from flows.demo import DemoConfig, run_demo

NAMES = {"qwen2_5_vl", "qwen3_vl", "glm4v", "dinov2", "dual"}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_models_table_lists_every_encoder(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    assert listed == NAMES == set(encoders.available())
    assert "Qwen2_5_VisionTransformerPretrainedModel" in out and "qwen2_5_vl + dinov2" in out


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == NAMES
    assert by_name["dinov2"]["default_pooling"] == "cls" and by_name["dinov2"]["has_cls"] is True
    assert by_name["qwen3_vl"]["model_class"] == "Qwen3VLVisionModel"
    assert all(r["description"] for r in rows)


def test_make_checkpoint_vlm_layout_loads(tmp_path, capsys):
    target = tmp_path / "qwen"
    assert main(["make-checkpoint", "qwen2_5_vl", str(target), "--layout", "vlm", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert (target / "model.safetensors.index.json").is_file()
    assert "model.safetensors.index.json" in out and "KB" in out
    enc = encoders.load("qwen2_5_vl", weights=target)
    res = enc.embed([np.full((90, 150, 3), 120, np.uint8)])
    assert res.pooled.shape == (1, enc.dim)


def test_unknown_encoder_is_one_line_exit_2(tmp_path, capsys):
    target = tmp_path / "never"
    assert main(["make-checkpoint", "nosuch", str(target)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1
    assert lines[0].startswith("towerflow: error: ") and "unknown encoder" in lines[0]
    assert all(name in lines[0] for name in NAMES)
    assert not target.exists()


def test_bad_layout_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["make-checkpoint", "dinov2", str(tmp_path / "d"), "--layout", "sideways"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_dir_that_is_a_file_exits_2(tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("not a directory")
    assert main(["make-checkpoint", "dinov2", str(existing)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "not a directory" in lines[0]
    assert main(["demo", "--out", str(existing)]) == 2


def test_unexpected_errors_are_not_swallowed(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("a bug, not a user mistake")

    monkeypatch.setattr(encoders, "make_checkpoint", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["make-checkpoint", "dinov2", str(tmp_path / "d")])


def _corpus_digest(corpus: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(corpus.iterdir())}


def test_demo_embeds_with_every_encoder_and_reports_bad_files(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--images", "8"]) == 0
    printed = capsys.readouterr().out
    first_corpus = _corpus_digest(out_dir / "corpus")
    assert len(first_corpus) == 10 and "errors (2):" in printed

    summary = run_demo(DemoConfig(out=out_dir, images=8, seed=0))  # second run: checkpoints reused
    assert set(summary["encoders"]) == NAMES
    for name, info in summary["encoders"].items():
        assert info["shape"][0] == 8 and info["images"] == 8, name
        assert info["dtype"] == "float32"
        assert info["checkpoint"] == "reused"
        assert info["revision"] in printed  # same weights as the first run
        assert 0 < info["tokens"][0] <= info["tokens"][1]
    assert summary["images"] == 8 and summary["files"] == 10
    assert {(e["file"], e["reason"]) for e in summary["errors"]} == {
        ("broken-truncated.jpg", "truncated"),
        ("broken-not-an-image.png", "not_an_image"),
    }
    assert _corpus_digest(out_dir / "corpus") == first_corpus  # deterministic from the seed


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0
    assert all(cmd in done.stdout for cmd in ("models", "make-checkpoint", "demo"))
