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


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local", "prefect_harness")
def test_demo_runs_the_embed_flow_then_resumes(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--images", "12"]) == 0
    printed = capsys.readouterr().out
    first_corpus = _corpus_digest(out_dir / "corpus")
    assert len(first_corpus) == 14
    assert "embedded 12, errors 2" in printed and "error decode/truncated: 1" in printed
    assert "model=qwen2_5_vl/" in printed and "model=dinov2/" in printed and "LanceDB (12 rows" in printed

    summary = run_demo(DemoConfig(out=out_dir, images=12, models=("qwen2_5_vl",)))  # second run
    counts = summary["summary"]["counts"]
    assert counts["embedded"] == 0 and counts["skipped_done"] == 14
    assert summary["sql"]["nearest"][0][0] == summary["sql"]["query"][0][0]  # an image is its own nearest
    assert abs(summary["sql"]["nearest"][0][1] - 1.0) < 1e-5 and summary["lance_hits"] == 4
    assert _corpus_digest(out_dir / "corpus") == first_corpus  # reused, not regenerated


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0
    assert all(cmd in done.stdout for cmd in ("models", "make-checkpoint", "demo", "embed", "runs"))


@pytest.fixture
def tiny_corpus(tmp_path):
    from _support import smooth_image

    d = tmp_path / "src"
    d.mkdir()
    smooth_image(40, 60).save(d / "a.png")
    return d


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "clip"], "unknown encoder 'clip'"),
        (["--weights", "/nonexistent/ckpt"], "no such directory"),
        (["--source", "/nonexistent/photos"], "does not exist"),
        (["--out", "FILE/lake"], "is not writable"),
        (["--dataset", "../escape"], "dataset '../escape' is not allowed"),
        (["--batch-tokens", "0"], "--batch-tokens must be positive"),
        (["--buffer-mb", "0"], "--buffer-mb must be positive"),
        (["--model", "qwen2_5_vl,dinov2"], "2 models but 3 weights"),
    ],
)
def test_embed_bad_arguments_exit_2_before_any_work(args, message, tiny_corpus, checkpoint, tmp_path, capsys):
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    opts = {"--model": "qwen2_5_vl", "--weights": str(checkpoint("qwen2_5_vl")), "--source": str(tiny_corpus),
            "--out": str(tmp_path / "lake")}  # fmt: skip
    for flag, value in zip(args[::2], args[1::2], strict=True):
        opts[flag] = value.replace("FILE", str(a_file))
    if opts["--model"] == "qwen2_5_vl,dinov2":
        opts["--weights"] = str(checkpoint("qwen2_5_vl")) + ",x,y"
    argv = ["embed", opts.pop("--source"), *[x for kv in opts.items() for x in kv]]
    assert main(argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("towerflow: error: ") and message in lines[0], lines
    assert not (tmp_path / "lake" / "_runs").exists()


def test_compile_is_refused_up_front_for_a_tower_without_it(tiny_corpus, checkpoint, tmp_path, capsys):
    argv = ["embed", str(tiny_corpus), "--out", str(tmp_path / "lake"), "--model", "dinov2",
            "--weights", str(checkpoint("dinov2")), "--compile"]  # fmt: skip
    assert main(argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert lines == ["towerflow: error: --compile is offered for the packed towers (Qwen, GLM), not dinov2"]
