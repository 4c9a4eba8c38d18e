"""The performance plumbing: the training-time estimate, `make repro` without a GPU,
and `make gpu-check` in CI size."""

import pytest

from pipeline.progress import Estimate


def test_estimate_is_said_once_after_the_first_steps():
    """A fake clock: step 1 takes 30 s (one-time costs), then 2 s per step. The estimate is said
    once 3 steps and 5 s after the first step, excludes the first step's rate but counts its time."""
    now = [0.0]
    lines = []
    eta = Estimate(100, "train", lines.append, clock=lambda: now[0])
    now[0] += 30
    eta(1)
    for _ in range(10):
        now[0] += 2
        eta(1)
    assert len(lines) == 1
    # said after step 4 (3 steps, 6 s after step 1): 36 s so far, 96 steps left at 2 s
    assert lines[0] == "train: 0.5 steps/s; estimated total 3.8 min for 100 steps, 3.2 min to go"


def test_estimate_is_measured_again_when_the_rate_changes():
    """A fake clock: 2 s per step, then, from step 30 on, 4 s per step (a machine that got busier). The first
    estimate holds while the rate does; the checks every 10 steps say a new one once the slower rate moves it by
    more than 10%, with the rate of the latest stretch, and nothing more while that holds."""
    now = [0.0]
    lines = []
    eta = Estimate(100, "train", lines.append, clock=lambda: now[0])
    for step in range(1, 100):
        now[0] += 2 if step <= 30 else 4
        eta(1)
        if step == 29:
            assert len(lines) == 1  # steady: said once
    assert len(lines) >= 2 and all("estimated total" in line for line in lines)  # the study's follower reads these
    # said first at step 4 (8 s, 96 steps left at 2 s: 200 s); checked at steps 14, 24, 34, …: at 34, 6 steps at
    # 2 s and 4 at 4 s since step 24 (2.8 s a step), 76 s elapsed, 66 steps left: 261 s
    assert lines[1] == "train: now 0.357 steps/s; estimated total 4.3 min for 100 steps (said 3.3 min), 3.1 min to go"
    # at 44 the rate is 4 s a step (116 s + 56 × 4 s = 340 s), said once more; from then on it holds
    assert lines[2] == "train: now 0.25 steps/s; estimated total 5.7 min for 100 steps (said 4.3 min), 3.7 min to go"
    assert len(lines) == 3


def test_no_estimate_when_the_run_ends_first():
    lines = []
    eta = Estimate(3, "train", lines.append, clock=lambda: 0.0)
    for _ in range(3):
        eta(1)
    assert lines == []


def subprocess_make(tmp_path, *args):
    """`make -s repro ARGS` in ``tmp_path`` (a copy of the Makefile: ``make_repro``), this environment as the venv."""
    import subprocess
    import sys
    from pathlib import Path

    venv = Path(sys.prefix)
    return subprocess.run(["make", "-s", "repro", f"VENV={venv}", f"STAMP={tmp_path / 'stamp'}", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def make_repro(tmp_path, *args):
    """`make repro` in a copy of the Makefile, with this environment as the venv and a stand-in
    for dvc (and exp-run) that prints what it was asked to run."""
    import shutil

    from helpers import REPO

    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy2(REPO / name, tmp_path / name)
    (tmp_path / "stamp").touch()  # newer than requirements.txt and pyproject.toml: nothing to install
    r = subprocess_make(tmp_path, "DVC=echo DVC-RAN", "EXP_RUN=echo DVC-RAN exp run", *args)
    ran = [line.removeprefix("DVC-RAN ") for line in r.stdout.splitlines() if line.startswith("DVC-RAN")]
    return r, ran


def test_make_repro_without_a_gpu_says_so_and_runs_the_cpu_preset(tmp_path):
    import torch

    r, ran = make_repro(tmp_path)
    assert r.returncode == 0, r.stderr
    if torch.cuda.is_available():
        assert ran == ["repro"]
    else:
        assert "no CUDA GPU" in r.stdout and "make repro PRESET=full" in r.stdout
        assert len(ran) == 1 and ran[0].startswith("exp run -S ")
    r, ran = make_repro(tmp_path, "PRESET=full")
    assert r.returncode == 0 and ran == ["repro"] and "no CUDA GPU" not in r.stdout
    r, ran = make_repro(tmp_path, "PRESET=cpu")
    assert r.returncode == 0 and len(ran) == 1 and ran[0].startswith("exp run -S ")
    r, ran = make_repro(tmp_path, "PRESET=gpu")
    assert r.returncode == 2 and ran == [] and "full, cpu or auto" in r.stderr and "done" not in r.stdout


def test_make_repro_ends_by_saying_where_the_results_are(tmp_path):
    """Its last lines name the report and the commands of the experiments view and the MLflow UI, which exist."""
    from pipeline.cli import COMMANDS

    for preset in ("PRESET=cpu", "PRESET=full"):
        r, ran = make_repro(tmp_path, preset)
        last = r.stdout.strip().splitlines()[-4:]
        assert r.returncode == 0 and last[0] == "make repro: done. Where the results are:", r.stdout
        assert "reports/report.html" in last[1] and "python -m pipeline exp-show" in last[2]
        assert "make ui" in last[3] and "python -m pipeline ui" in last[3]
    assert {"exp-show", "ui"} <= set(COMMANDS)
    make = (tmp_path / "Makefile").read_text()
    assert "\nui: setup\n\tpython -m pipeline ui\n" in make
    failed = subprocess_make(tmp_path, "PRESET=cpu", "EXP_RUN=false")
    assert failed.returncode != 0 and "done" not in failed.stdout  # no pointer to results a failed run did not make


@pytest.mark.slow
@pytest.mark.e2e
def test_gpu_check_in_ci_size(tmp_path, idx_dir):
    """`make gpu-check`'s driver at CI size on the CPU, through the typer command: every part runs and
    lands in the JSON and the one table (train per compile mode with the profiler's host/GPU split,
    sampling per inference path, the warm-cache process, the experiment's stage commands with FID per
    cell and grids, ours vs diffusers, DDP on two gloo processes), in at most 8 files."""
    import json

    from typer.testing import CliRunner

    from benchmarks.cli import app

    out = tmp_path / "gc"
    r = CliRunner().invoke(app, ["gpu-check", "--out", str(out), "--size", "ci", "--device", "cpu",
                                 "--data", str(idx_dir), "--ddp-processes", "2"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()[-3000:]
    assert report["notes"] == [], (report["notes"], log)
    assert report["train"]["train.none"]["images_per_second"] > 0, log
    assert report["train"]["profile.none"]["host_ms_per_step"] > 0
    assert report["train"]["ema_update"]["averages_ms"] > 0
    assert report["sample"]["sample.none"]["image_steps_per_second"] > 0
    assert "compile none" in report["warm"]["warm.train"]["path"]
    e = report["experiment"]
    assert all(v["status"] == "ok" for v in e["stages"].values()), (e["stages"], log)
    assert set(e["cells"]) == {"ddim-2", "ddpm-2"} and e["cells"]["ddim-2"]["fid"] > 0 and e["nll"]["bits_per_dim"] > 0
    assert report["ratios"]["train"]["none vs none"] > 0
    assert report["ddp"]["speedup"] > 0
    assert report["projection"]["seconds"] > 0
    table = (out / "gpu_check.md").read_text()
    for needle in ("| train, default config, batch 4 | none |", "| sample ddim-2, batch 4 | autocast |",
                   "host ", "| ours / diffusers, train |", "projected default `dvc repro`", "| fid ddim-2 | ok |"):
        assert needle in table, table
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and {"gpu_check.json", "gpu_check.md", "gpu_check.log", "profile.txt", "grids.png"} <= set(files)



@pytest.mark.parametrize("shape,nrow", [((64, 1, 28, 28), 8), ((10, 3, 8, 8), 4), ((3, 1, 5, 7), 8)])
def test_image_grid_is_torchvisions(tmp_path, shape, nrow):
    """The PNG grid (written without importing torchvision) has the bytes of torchvision's save_image."""
    import io

    import torch
    from torchvision.utils import save_image

    from pipeline.images import write_image_grid

    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_image_grid(tmp_path / "grid.png", images, nrow=nrow)
    png = io.BytesIO()
    save_image(images.float() / 255.0, png, format="png", nrow=nrow, padding=2)
    assert (tmp_path / "grid.png").read_bytes() == png.getvalue()


def test_gpu_check_sizes_define_the_same_settings():
    """Every setting a part reads exists at both sizes: a key only the CI size had once cost a GPU run
    its training figures (KeyError on the GPU, where the CI-size test could not see it)."""
    from benchmarks.gpu_check import EXPERIMENT, EXPERIMENT_CELLS, LIMITS
    from benchmarks.gpu_parts import SIZES

    assert set(SIZES["gpu"]) == set(SIZES["ci"])
    assert set(LIMITS["gpu"]) == set(LIMITS["ci"]) and set(EXPERIMENT_CELLS) == set(EXPERIMENT) == {"gpu", "ci"}
