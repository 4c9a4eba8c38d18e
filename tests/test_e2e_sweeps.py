"""End to end, the experiments that must not retrain: a sampling change makes only the sampling
stages stale (and an edit of ddpm/samplers.py is seen by them only); a post-hoc EMA length
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
    """What a change of sampling makes stale (`dvc status`). That running them re-runs what reads their outputs,
    the FID cells, and restores the rest: test_study's trailing-spacing experiment and the sweeps below."""
    root, env = repo
    params = (root / "params.yaml").read_text()

    def stale_after(section: str, key: str, value) -> set[str]:
        p = yaml.safe_load(params)
        p[section][key] = value(p[section][key])
        (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        try:
            return set(json.loads(sh(["dvc", "status", "--json"], root, env)))
        finally:
            (root / "params.yaml").write_text(params)

    # the check stage reads all of params.yaml, but its output does not change: only the
    # sampling stages, fid_floor (the real-data floor uses as many images), report (its header
    # shows sample.num_samples) and the always-run check and log are out of date; never fid_ref,
    # whose reference does not depend on sampling
    changed = stale_after("sample", "num_samples", lambda n: 12)
    assert changed == {"check", "fid_floor", "sample@ddpm-3", "sample@ddim-3", "report", "log"}, changed
    # another sampling seed: the same stages out of date but report, fid_ref still not
    changed = stale_after("sample", "seed", lambda s: s + 1)
    assert changed == {"check", "fid_floor", "sample@ddpm-3", "sample@ddim-3", "log"}, changed

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
