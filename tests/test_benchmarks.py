"""Every benchmark still runs: each at a toy size, in this process (torch is imported once), so that a change of the
code they time cannot leave a benchmark broken until someone measures with it. Their figures are not checked here
(docs/performance.md has them); bench_distributed.py runs under torchrun and gpu_check.sh has its own dry run
(tests/test_speed_options.py)."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FULL_SIZE = REPO.parent / "shared" / "isic-sample-full"

# script, its toy arguments, a text its output must hold (the table it prints), whether it reads the full-size photos
TOY_RUNS = [
    ("bench_click.py", ["--models", "sam2.1_hiera_t", "--sizes", "64", "--photos", "1", "--clicks", "1",
                        "--threads", "1"], "| sam2.1_hiera_t | 64 |", True),
    ("bench_annotation_cost.py", ["--sizes", "64", "--k", "1", "--repeats", "1", "--threads", "1"], "per click", True),
    ("bench_al_scoring.py", ["--size", "64", "--images", "2", "--batch-size", "2", "--repeats", "1", "--threads",
                             "1"], "naive/scoring", False),
    ("bench_decode_cache.py", ["--img_size", "64", "--epochs", "2", "--large_width", "0"], "cache", True),
    ("bench_embedding_selection.py", ["--sizes", "200", "--labeled", "0", "--budgets", "4", "--strategies",
                                      "coreset", "typiclust", "--threads", "1"], "typiclust", False),
    ("bench_hd95.py", ["--height", "200", "--width", "300"], "hd95", False),
    ("bench_validation.py", ["--repeats", "1", "--skip-before"], "decode", True),
    ("score_formula_topk.py", ["--pools", "2"], "pool", False),
    ("bench_image_encoder.py", ["--models", "sam2.1_hiera_t", "--size", "64", "--runs", "1", "--warmup", "0"],
     "sam2.1_hiera_t", False),
    ("bench_run_folder_sizes.py", ["--models", "sam2.1_hiera_t"], "sam2.1_hiera_t", False),
]


# it imports the official sam2 beside ours, which needs an interpreter where ours is not imported yet
FRESH_INTERPRETER = {"bench_image_encoder.py"}


def run_in_this_process(script: str, argv: list, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setattr(sys, "path", [str(REPO / "benchmarks"), *sys.path])
    try:
        runpy.run_path(str(REPO / "benchmarks" / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), f"{script} {' '.join(argv)} exited with {stop.code}"


@pytest.mark.parametrize("script, argv, printed, full_size", TOY_RUNS, ids=[run[0] for run in TOY_RUNS])
def test_the_benchmark_runs_at_a_toy_size(script, argv, printed, full_size, monkeypatch, capsys):
    if full_size and not (FULL_SIZE / "images").is_dir():
        pytest.skip(f"needs the full-size ISIC photos at {FULL_SIZE}")
    if script in FRESH_INTERPRETER:
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{script} {' '.join(argv)} exited with {done.returncode}:\n{done.stderr[-2000:]}"
        out = done.stdout
    else:
        run_in_this_process(script, argv, monkeypatch)
        out = capsys.readouterr().out
    assert printed.lower() in out.lower(), f"{script} printed no '{printed}':\n{out[-2000:]}"
