"""End to end: `dvc repro` and `dvc exp run -S schedule=cosine` on a tiny config in a
temporary copy of the repository; both experiments in `dvc exp show` and MLflow. A post-hoc
EMA length (`-S ema.sigma_rel=...`) and the raw weights (`-S sample.weights=raw`) never retrain."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, tiny_params


def sh(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory, idx_dir):
    root = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith("tests/"):
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    p = tiny_params(idx_dir)
    p["sample"].update(samplers=["ddpm", "ddim"], steps=[3])
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": "", "PIPELINE_LIVE_MLFLOW": "1"}
    env.pop("MLFLOW_TRACKING_URI")
    sh(["git", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "tiny"], root, env)
    return root, env


def test_repro_then_ablation(repo):
    root, env = repo
    sh(["dvc", "repro"], root, env)
    fid = json.loads((root / "metrics/fid.json").read_text())
    assert {s: sorted(v) for s, v in fid["fid"].items()} == {"ddpm": ["3"], "ddim": ["3"]}
    assert (root / "reports/report.md").is_file() and (root / "mlflow.db").is_file()
    # nothing changed: everything but the always-run check and log stages is up to date
    status = sh(["dvc", "status", "--json"], root, env)
    assert set(json.loads(status)) <= {"check", "log"}

    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "baseline"], root, env)
    out = sh(["dvc", "exp", "run", "-S", "schedule=cosine"], root, env)
    # a sampling-only change would not retrain; a schedule change must
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out

    show = json.loads(sh(["dvc", "exp", "show", "--json"], root, env))
    rows = []
    for commit in show:
        rows.append(commit)
        for exp in commit.get("experiments") or []:
            rows.extend(exp.get("revs", []))
    schedules, fids = [], []
    for row in rows:
        data = (row.get("data") or {})
        params = data.get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = data.get("metrics", {}).get("metrics/fid.json", {}).get("data", {})
        if params and metrics:
            schedules.append(params["schedule"])
            fids.append(metrics["fid"]["ddim"]["3"])
    assert "linear" in schedules and "cosine" in schedules, show

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ddpm"], filter_string="tags.`pipeline.fingerprint` != ''",
                              output_format="list")
    logged = {r.data.params["schedule"] for r in runs}
    assert logged == {"linear", "cosine"}
    assert any(r.data.tags.get("dvc.exp_name", "workspace") != "workspace" for r in runs)

    # back to the baseline's params: every stage that does work comes from DVC's run-cache
    out = sh(["dvc", "exp", "run", "-S", "schedule=linear"], root, env)
    assert set(re.findall(r"Running stage '([^']+)'", out)) == {"check", "log"}, out
    assert "Stage 'train' is cached - skipping run" in out, out
    assert json.loads((root / "metrics/fid.json").read_text())["fid"]["ddim"]["3"] == fids[schedules.index("linear")]


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


def outputs(root: Path) -> dict[str, bytes]:
    """Every file the stages wrote (the folders of dvc.yaml's outputs)."""
    folders = ("data/prepared", "data/reference", "models", "metrics", "plots", "logs", "reports", "samples")
    return {str(f.relative_to(root)): f.read_bytes() for d in folders for f in sorted((root / d).rglob("*"))
            if f.is_file()}


@pytest.mark.parametrize("override", ["+model.chh=3", "train.steps=0"])
def test_bad_value_under_dvc_loses_nothing(repo, override):
    """A bad `-S` fails in the check stage, before DVC deletes any stage's outputs."""
    root, env = repo
    params = (root / "params.yaml").read_text()
    before = outputs(root)
    assert {"models/model.pt", "metrics/train.json", "plots/train_loss.csv", "logs/train_timing.json",
            "metrics/fid.json", "samples/ddim-3/samples.pt", "data/prepared/train.pt"} <= before.keys()
    try:
        r = subprocess.run(["dvc", "exp", "run", "-S", override], cwd=root, env=env, capture_output=True, text=True)
        assert r.returncode != 0, r.stdout
        key = override.lstrip("+").split("=")[0]
        assert f"error: invalid params in params.yaml: {key}" in r.stdout + r.stderr, r.stdout + r.stderr
        assert "Running stage 'check'" in r.stdout and "Running stage 'train'" not in r.stdout
        assert outputs(root) == before  # every earlier output still there, unchanged
    finally:
        (root / "params.yaml").write_text(params)


def stages_run(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def test_ema_sweep_and_raw_weights_never_retrain(repo, tmp_path):
    root, env = repo
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "sampling"], root, env)
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


def test_push_then_pull_restores_a_clone(repo, tmp_path):
    """The default local remote of the README: `dvc push`, then a fresh clone gets every output by `dvc pull`."""
    root, env = repo
    sh(["dvc", "remote", "add", "-d", "local", str(tmp_path / "dvc-remote")], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "results and the remote"], root, env)
    sh(["dvc", "push"], root, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "models/model_ema.pt").exists()
    sh(["dvc", "pull"], clone, env)
    for f in ("models/model.pt", "models/model_ema.pt", "data/prepared/train.pt", "samples/ddim-3/samples.pt",
              "samples/ddim-3/grid.png"):
        assert (clone / f).read_bytes() == (root / f).read_bytes(), f
    assert set(json.loads(sh(["dvc", "status", "--json"], clone, env))) <= {"check", "log"}
