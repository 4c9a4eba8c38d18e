"""End to end, the experiments that must not retrain: a sampling change re-runs only the
sampling stages (and an edit of ddpm/samplers.py is seen by them only); a post-hoc EMA length
(`-S ema.sigma_rel=...`) re-runs ema and what reads its checkpoint, the raw weights
(`-S sample.weights=raw`) only the cells; FID against σ_rel across the experiments.

Each test works in its own copy of the session fixture ``reproduced`` (conftest.py: the tiny
repository after one `dvc repro`, built once per test run), so it can run alone, and this file
runs beside tests/test_e2e.py on another xdist worker."""

import json
import re
import sys

import pytest
import yaml
from helpers import copy_repository, git_env, sh

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def repo(reproduced, tmp_path):
    return copy_repository(reproduced, tmp_path / "repo"), git_env(system_metrics=False)


def test_sampling_change_does_not_retrain(repo):
    root, env = repo
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["sample"]["num_samples"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    # the check stage reads all of params.yaml, but its output does not change: only the
    # sampling stages, fid_floor (the real-data floor uses as many images), report (its header
    # shows sample.num_samples) and the always-run check and log are out of date; never fid_ref,
    # whose reference does not depend on sampling
    changed = set(json.loads(sh(["dvc", "status", "--json"], root, env)))
    assert changed == {"check", "fid_floor", "sample@ddpm-3", "sample@ddim-3", "report", "log"}, changed
    out = sh(["dvc", "repro"], root, env)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"check", "fid_floor", "sample@ddpm-3", "sample@ddim-3", "fid@ddpm-3", "fid@ddim-3", "report",
                   "log"}, out

    # another sampling seed: the same stages out of date, fid_ref still not
    params = (root / "params.yaml").read_text()
    p["sample"]["seed"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        changed = set(json.loads(sh(["dvc", "status", "--json"], root, env)))
        assert changed == {"check", "fid_floor", "sample@ddpm-3", "sample@ddim-3", "log"}, changed
    finally:
        (root / "params.yaml").write_text(params)

    # a sampler edit: the sampling stages only (each stage depends on exactly what it imports)
    samplers = root / "ddpm/samplers.py"
    source = samplers.read_text()
    samplers.write_text(source + "# an edit\n")
    try:
        changed = set(json.loads(sh(["dvc", "status", "--json"], root, env)))
        assert changed == {"check", "sample@ddpm-3", "sample@ddim-3", "log"}, changed
    finally:
        samplers.write_text(source)


def stages_run(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def test_ema_sweep_and_raw_weights_never_retrain(repo, tmp_path):
    root, env = repo
    # post-hoc EMA: a new sigma_rel re-runs ema and what reads its checkpoint, never train
    ran = stages_run(sh(["dvc", "exp", "run", "-S", "ema.sigma_rel=0.07"], root, env))
    cells = {"sample@ddpm-3", "sample@ddim-3", "fid@ddpm-3", "fid@ddim-3"}
    assert ran == {"check", "ema", *cells, "nll", "denoise", "report", "log"}, ran
    ema = json.loads((root / "metrics/ema.json").read_text())["average"]
    assert ema["source"] == "posthoc" and ema["sigma_rel"] == 0.07 and ema["snapshots"] == 6  # 3 steps × 2 profiles
    assert (root / "plots/fid_vs_sigma_rel.csv").read_text().splitlines()[1].startswith("ddpm,3,0.07,")
    # the raw weights: a sampling-time choice
    ran = stages_run(sh(["dvc", "exp", "run", "-S", "sample.weights=raw"], root, env))
    assert ran == {"check", *cells, "report", "log"}, ran
    assert json.loads((root / "samples/ddim-3/info.json").read_text())["weights"] == "raw"

    # FID against sigma_rel across the experiments, from the real `dvc exp show --json`
    figure = tmp_path / "fid_vs_sigma_rel.png"
    out = sh([sys.executable, "-m", "pipeline", "compare", "--sigma-rel-figure", str(figure)], root, env)
    assert "## FID vs EMA length σ_rel (3 sampling steps" in out and figure.stat().st_size > 0
    assert "| 0.07 (posthoc) |" in out and "| 0.1 (train) |" in out and "| raw weights |" in out
