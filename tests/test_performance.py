"""The performance plumbing: the training-time estimate, `make repro` without a GPU,
and `make gpu-check`: its dry run, a killed run, its plan and projection."""

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
def test_gpu_check_dry_run(tmp_path, idx_dir):
    """`make gpu-check`'s code paths at a tiny size on the CPU, through the typer command (about a minute):
    every part that can run there runs and lands in the JSON and the one table (training with the
    profiler's host/GPU split and the EMA update, sampling per path, the pipeline's stage commands with
    FID and bits/dim, ours vs diffusers, DDP on two gloo processes); the CUDA-only parts are skipped and
    named; each part's budget is shown; the projection says which inputs were measured and which carried
    over; at most 6 files."""
    import json

    from typer.testing import CliRunner

    from benchmarks.cli import app
    from benchmarks.gpu_check import PLAN
    from benchmarks.gpu_parts import native_bf16

    out = tmp_path / "gc"
    r = CliRunner().invoke(app, ["gpu-check", "--out", str(out), "--dry-run", "--data", str(idx_dir),
                                 "--ddp-processes", "2"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()[-3000:]
    assert report["notes"] == [], (report["notes"], log)
    status = {row["part"]: row["status"] for row in report["plan"]}
    cuda_only = {p.name for p in PLAN if p.cuda_only}
    assert all(status[name].startswith("skipped: CUDA only") for name in cuda_only), status
    native = native_bf16("cpu")  # else a bf16 part is skipped, saying why, and the others run in float32
    assert all(status[p.name] == "ok" or (p.bf16 and not native and "no native bf16" in status[p.name])
               for p in PLAN if p.name not in cuda_only), (status, log)
    assert ("bf16" if native else "fp32") in report["figures"]["sample.none"]["path"]
    f = report["figures"]
    assert f["train.none"]["images_per_second"] > 0 and f["profile.none"]["host_ms_per_step"] > 0
    assert f["ema_update"]["averages_ms"] > 0 and f["sample.none"]["image_steps_per_second"] > 0
    assert f["stage.fid"]["fid"] >= 0 and f["stage.nll"]["bits_per_dim"] > 0 and f["stage.train"]["train_seconds"] > 0
    assert f["peer.eager.train.peer"]["images_per_second"] > 0 and f["ddp"]["speedup"] > 0
    proj = report["projection"]
    assert proj["seconds"] > 0 and proj["measured"] > 0 and proj["carried_over"] > 0
    table = (out / "gpu_check.md").read_text()
    for p in PLAN:  # every part with its budget
        assert f"| {p.name}{' ᵖ' if p.projection else ''} | {p.budget} |" in table, p.name
    for needle in ("Dry run", "## Projected default `dvc repro`", "stage.fid: measured",
                   "train.reduce-overhead: carried over (H200, 2026-12-04)", "skipped: CUDA only (CUDA graphs)",
                   "profile: host", "FID", "bits/dim"):
        assert needle in table, needle
    assert "train.step-graph" in r.output and "budget" in r.output  # the plan, printed first
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["grids.png", "gpu_check.json", "gpu_check.log", "gpu_check.md", "profile.txt"])


def start_check(out, idx_dir):
    """A dry run of the stage parts in the background, and the moment its first figure is written."""
    import json
    import os
    import subprocess
    import sys
    import time

    from helpers import REPO

    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "gpu-check", "--dry-run", "--out", str(out),
                             "--data", str(idx_dir), "--parts", "stage"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else {}
        if "stage.prepare" in report.get("figures", {}):
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no figure within 120 s")


@pytest.mark.slow
def test_a_killed_gpu_check_leaves_the_table_of_what_it_measured(tmp_path, idx_dir):
    """SIGKILL to the whole check, right after its first figure: the table is there, with that figure,
    the part that was running named, the rest pending, and the projection from carried-over figures.
    SIGTERM (a time limit) to the check alone: the running part is killed and marked cut off."""
    import os
    import signal

    proc = start_check(tmp_path / "killed", idx_dir)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    table = (tmp_path / "killed" / "gpu_check.md").read_text()
    assert "| stage.prepare ᵖ | 17 | ok |" in table or "| stage.prepare ᵖ | 17 | running |" in table, table
    assert "s the process" in table  # prepare's figure
    assert "| pending |" in table and "## Projected default `dvc repro`" in table and "carried over" in table
    assert "skipped: not asked for (--parts)" in table

    proc = start_check(tmp_path / "stopped", idx_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    table = (tmp_path / "stopped" / "gpu_check.md").read_text()
    assert "| cut off: the check was stopped |" in table and "| pending |" in table, table


def test_gpu_check_without_time_still_prints_the_projection(tmp_path):
    """A window too short for any part: every part says why it was skipped, and the projection is printed
    from the carried-over figures alone, each marked so. A second run keeps the first's report, and takes
    its figures as the carried-over ones when told to; a bad --carry or --parts is refused first."""
    import json

    from benchmarks.gpu_check import main

    (tmp_path / "gc").mkdir()
    (tmp_path / "gc" / "gpu_check.json").write_text(json.dumps({"figures": {"stage.fid": {"status": "ok", "seconds": 4.0}},
                                                                "environment": {"device_name": "NVIDIA H100",
                                                                                "started": "2027-01-02 10:00:00"}}))
    with pytest.raises(SystemExit, match="unknown parts"):
        main(tmp_path / "gc", dry_run=True, device="cpu", parts=["stag"])
    with pytest.raises(SystemExit, match="not a gpu_check.json"):
        main(tmp_path / "gc", dry_run=True, device="cpu", carry=tmp_path / "missing.json")
    assert (tmp_path / "gc" / "gpu_check.json").is_file()  # refused before anything was touched
    report = main(tmp_path / "gc", dry_run=True, device="cpu", budget=3)
    previous = tmp_path / "gc" / "gpu_check.previous.json"
    assert json.loads(previous.read_text())["figures"]["stage.fid"]["seconds"] == 4.0
    carried = main(tmp_path / "gc2", dry_run=True, device="cpu", budget=3, carry=previous)
    fid = next(row for row in carried["projection"]["terms"] if row["term"].startswith("fid"))
    assert fid["seconds"] == 20 * 4.0 and fid["inputs"]["stage.fid"] == "carried over (NVIDIA H100, 2027-01-02)"
    assert all(row["status"].startswith("skipped: ") for row in report["plan"])
    assert any("out of time: needs 120 s" in row["status"] for row in report["plan"])
    proj = report["projection"]
    assert proj["measured"] == 0 and proj["carried_over"] > 0 and proj["seconds"] > 600
    table = (tmp_path / "gc" / "gpu_check.md").read_text()
    assert "train.reduce-overhead: carried over (H200, 2026-12-04)" in table and "assumed" in table


def test_projection_takes_each_input_from_this_run_where_measured():
    """A measured figure replaces the carried-over one (and says so); a failed stage's does not; a faster
    measured path is the one the training term uses."""
    from benchmarks.gpu_check import CARRIED, environment_stub, new_report, project

    report = new_report(environment_stub(), dry_run=False, budget=470, carry=None)
    base = project(report)
    report["figures"]["train.step-graph"] = {"images_per_second": 20000.0, "compile_seconds": 90.0}
    report["figures"]["stage.fid"] = {"status": "timed out after 39 s", "seconds": 39.0}
    report["figures"]["stage.classifier"] = {"status": "ok", "seconds": 20.0}
    got = project(report)
    terms = {row["term"].split(":")[0]: row for row in got["terms"]}
    assert "step-graph" in [row["term"] for row in got["terms"]][0]
    assert terms["train"]["inputs"] == {"train.step-graph": "measured"}
    assert terms["train"]["seconds"] == pytest.approx(20000 * 128 / 20000.0 + 90.0, abs=0.1)
    assert terms["fid"]["inputs"]["stage.fid"].startswith("carried over")  # the failed figure is not used
    assert terms["fid"]["seconds"] == pytest.approx(20 * CARRIED["stage.fid"]["seconds"])
    assert terms["prepare, classifier, ema, fid_ref"]["inputs"]["stage.classifier"] == "measured"
    assert got["seconds"] < base["seconds"] and got["measured"] == 2


def test_a_figure_reaches_the_table_the_moment_it_is_recorded(tmp_path):
    from benchmarks.gpu_check import environment_stub, new_report, record, save

    save(tmp_path, new_report(environment_stub(), dry_run=False, budget=470, carry=None))
    record(tmp_path, "sample.cudagraphs", {"image_steps_per_second": 123456.0, "first_call_seconds": 0.4,
                                           "compile_seconds": 0.3, "path": "bf16"})
    table = (tmp_path / "gpu_check.md").read_text()
    assert "123,456 image-steps/s, first call 0.4 s" in table and "sample.cudagraphs: measured" in table
    assert not list(tmp_path.glob(".*.tmp"))


def test_gpu_check_plan_fits_its_window():
    """The projection's inputs come first and fit in the 8-minute window by their budgets; every budget
    is the H200's seconds + 30% (the ones measured there: at least 1.3 × that figure)."""
    from benchmarks.gpu_check import MARGIN, PARTS, PLAN, TOTAL

    first_profile = next(k for k, p in enumerate(PLAN) if not p.projection)
    assert sum(p.budget for p in PLAN[:first_profile]) <= TOTAL <= 8 * 60 - 10
    assert first_profile >= 13 and all(p.name.startswith(("train.", "sample.", "stage.", "likelihood."))
                                       for p in PLAN[:first_profile])
    for name, h200 in (("train.cudagraphs", 12.6), ("train.reduce-overhead", 84.2), ("sample.reduce-overhead", 24.7),
                       ("stage.classifier", 29.9), ("stage.prepare", 12.8), ("stage.sample", 12.4)):
        assert PARTS[name].budget >= MARGIN * h200, name
    assert all(p.basis for p in PLAN)


def test_default_repro_is_params_yaml():
    """The projection's default `dvc repro` is what params.yaml says (a test, since the check itself reads no YAML)."""
    import yaml

    from benchmarks.gpu_check import DEFAULT_REPRO
    from helpers import committed_params_text

    p = yaml.safe_load(committed_params_text())
    assert (DEFAULT_REPRO["train_steps"], DEFAULT_REPRO["batch_size"]) == (p["train"]["steps"], p["train"]["batch_size"])
    assert list(DEFAULT_REPRO["samplers"]) == p["sample"]["samplers"] and list(DEFAULT_REPRO["steps"]) == p["sample"]["steps"]
    assert DEFAULT_REPRO["num_samples"] == p["sample"]["num_samples"] and DEFAULT_REPRO["timesteps"] == p["timesteps"]
    assert DEFAULT_REPRO["nll_images"] == p["nll"]["num_images"]
    assert p["samplers"]["heun"]["kind"] == "heun" and DEFAULT_REPRO["evaluations_per_step"] == {"heun": 2}


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
    from benchmarks.gpu_check import CELL, DDP_STEPS, EXPERIMENT
    from benchmarks.gpu_parts import SIZES

    assert set(SIZES["gpu"]) == set(SIZES["ci"])
    assert set(CELL) == set(EXPERIMENT) == set(DDP_STEPS) == set(SIZES) == {"gpu", "ci"}
