"""End to end: `dvc repro` and `dvc exp run -S schedule=cosine` on a tiny config in a
temporary copy of the repository; both experiments in `dvc exp show` and MLflow; a bad `-S`
loses nothing; `dvc push` / `dvc pull` into a fresh clone. (A sampling change, a post-hoc EMA
length and the raw weights never retrain: tests/test_e2e_sweeps.py.)

The `dvc repro` is the session fixture ``reproduced`` (conftest.py), run once per test run;
each test here works in its own copy of it (``repo``), so each can run alone."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import copy_repository, git_env, sh

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def repo(reproduced, tmp_path):
    return copy_repository(reproduced, tmp_path / "repo"), git_env(system_metrics=False)


def test_repro_then_ablation(repo, reproduced):
    root, env = repo
    # `dvc repro` (the fixture, committed as the baseline) ran every stage, each matrix cell once
    ran = re.findall(r"Running stage '([^']+)'", (reproduced.parent / "repro.out").read_text())
    assert len(ran) == len(set(ran)) and {"check", "prepare", "classifier", "train", "ema", "sample@ddpm-3",
                                          "sample@ddim-3", "fid@ddpm-3", "fid@ddim-3", "nll", "report", "log"} <= set(ran)
    fid = json.loads((root / "metrics/fid.json").read_text())
    assert {s: sorted(v) for s, v in fid["fid"].items()} == {"ddpm": ["3"], "ddim": ["3"]}
    assert (root / "reports/report.md").is_file() and (root / "mlflow.db").is_file()
    # nothing changed: everything but the always-run check and log stages is up to date
    status = sh(["dvc", "status", "--json"], root, env)
    assert set(json.loads(status)) <= {"check", "log"}

    out = sh(["dvc", "exp", "run", "-S", "schedule=cosine"], root, env)
    # a sampling-only change would not retrain; a schedule change must
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out

    show = json.loads(sh(["dvc", "exp", "show", "--json"], root, env))
    rows = []
    for commit in show:
        rows.append(commit)
        for exp in commit.get("experiments") or []:
            rows.extend(exp.get("revs", []))
    schedules = []
    for row in rows:
        data = (row.get("data") or {})
        params = data.get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = data.get("metrics", {}).get("metrics/fid.json", {}).get("data", {})
        if params and metrics:
            schedules.append(params["schedule"])
    assert "linear" in schedules and "cosine" in schedules, show

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ddpm"], filter_string="tags.`pipeline.fingerprint` != ''",
                              output_format="list")
    logged = {r.data.params["schedule"] for r in runs}
    assert logged == {"linear", "cosine"}
    assert any(r.data.tags.get("dvc.exp_name", "workspace") != "workspace" for r in runs)
    # (an experiment run again restores every stage that does work from DVC's run-cache, with the same
    # metrics: test_study's rerun after an interruption)


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


def test_an_edit_of_the_unet_keeps_the_ruler_and_the_data(repo):
    """`dvc status` after a one-line edit of ddpm/unet.py: train and what comes after it are stale; the data,
    the FID classifier, its reference statistics and the real-data floor (the ruler) are up to date. An edit
    of the report re-runs the report alone (check and log run every time)."""
    root, env = repo
    unet = root / "ddpm/unet.py"
    unet.write_text(unet.read_text() + "# an edit\n")
    stale = set(json.loads(sh(["dvc", "status", "--json"], root, env)))
    assert {"train", "ema", "sample@ddpm-3", "nll"} <= stale, stale
    assert not {"prepare", "classifier", "fid_ref", "fid_floor"} & stale, stale
    sh(["git", "checkout", "ddpm/unet.py"], root, env)
    report = root / "pipeline/stages/report.py"
    report.write_text(report.read_text() + "# an edit\n")
    assert set(json.loads(sh(["dvc", "status", "--json"], root, env))) == {"check", "report", "log"}


def test_a_pinned_ruler_stays_put(repo):
    """`ruler pin` keeps this workspace's ruler in rulers/<extractor>-<id>/ (DVC-tracked); with fid.ruler naming
    it, retraining the classifier (another classifier.steps, an edit of its code) recomputes no FID: the
    classifier and fid_ref stages copy the pinned files, byte for byte, and every FID keeps its ruler."""
    root, env = repo
    fid = json.loads((root / "metrics/fid.json").read_text())
    shown = json.loads(sh([sys.executable, "-m", "pipeline", "ruler"], root, env))
    assert shown["id"] == fid["ruler"] and shown["extractor"] == "ddpm-classifier"
    out = sh([sys.executable, "-m", "pipeline", "ruler", "pin"], root, env)
    folder = f"rulers/ddpm-classifier-{fid['ruler']}"
    assert f"fid.ruler: {folder}" in out and (root / f"{folder}.dvc").is_file()
    assert json.loads((root / folder / "ruler.json").read_text())["ruler"] == shown
    classifier = (root / "models/classifier.pt").read_bytes()
    out = sh(["dvc", "exp", "run", "-S", f"fid.ruler={folder}", "-S", "classifier.steps=7"], root, env)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert {"classifier", "fid_ref"} <= ran and not {s for s in ran if s.startswith(("fid@", "fid_floor", "train"))}, ran
    assert (root / "models/classifier.pt").read_bytes() == classifier
    assert json.loads((root / "metrics/fid.json").read_text()) == fid
    # a pinned folder changed by hand is refused before any work
    (root / folder / "stats.pt").write_bytes(b"not the statistics")
    r = subprocess.run(["dvc", "exp", "run", "-S", "classifier.steps=8"], cwd=root, env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "stats.pt has changed since it was pinned" in r.stdout + r.stderr
