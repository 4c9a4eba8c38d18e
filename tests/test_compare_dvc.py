"""`compare` on a real DVC repository: a one-stage pipeline whose metrics follow its params
(seconds, no training), run with `dvc repro` and `dvc exp run`, read through DVC's own
`Repo.experiments.show` as the command does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

pytestmark = pytest.mark.slow  # `dvc repro` and `dvc exp run` subprocesses

# the stage: metrics/fid.json in the shape the report stage writes, its FID a function of the params
SCORE = """import json, yaml
p = yaml.safe_load(open("params.yaml"))
fid = {"linear": 30.0, "cosine": 21.5}[p["schedule"]] + p["seed"]
json.dump({"fid": {"ddim": {"3": fid}}, "best": {"fid": fid, "sampler": "ddim", "steps": 3}},
          open("metrics/fid.json", "w"))
"""
DVC_YAML = {"stages": {"score": {"cmd": "python score.py", "deps": ["score.py"],
                                 "params": ["schedule", "prediction", "seed"],
                                 "metrics": [{"metrics/fid.json": {"cache": False}}]}}}


def sh(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A committed baseline (linear) and the experiment cosine-exp, whose results `dvc exp run`
    left in the workspace."""
    root = tmp_path_factory.mktemp("compare") / "repo"
    (root / "metrics").mkdir(parents=True)
    (root / "score.py").write_text(SCORE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"schedule": "linear", "prediction": "eps", "seed": 0}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh(["git", "init", "-q", "-b", "main"], root, env)
    sh(["dvc", "init", "-q"], root, env)
    sh(["dvc", "repro", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "baseline"], root, env)
    sh(["dvc", "exp", "run", "-q", "-n", "cosine-exp", "-S", "schedule=cosine"], root, env)
    return root


def compare(root: Path, monkeypatch) -> tuple[str, list[dict]]:
    monkeypatch.chdir(root)
    res = CliRunner().invoke(app, ["compare", "--out", "compare.md"])
    assert res.exit_code == 0, res.output
    return res.output, json.loads((root / "compare.json").read_text())


def test_the_workspace_holding_an_experiment_is_one_row(dvc_repo, monkeypatch):
    """After `dvc exp run` the workspace repeats cosine-exp: one row, named by the experiment."""
    out, rows = compare(dvc_repo, monkeypatch)
    assert [(r["experiment"], r["best_fid"]) for r in rows] == [("main", 30.0), ("cosine-exp", 21.5)], out
    assert [r["workspace"] for r in rows] == [False, True]
    assert "| cosine-exp (workspace) |" in out and "| workspace |" not in out


def test_a_workspace_that_differs_stays_its_own_row(dvc_repo, monkeypatch):
    """Params changed and not run yet: the workspace is no experiment's run."""
    params = dvc_repo / "params.yaml"
    before = params.read_text()
    params.write_text(yaml.safe_dump({**yaml.safe_load(before), "seed": 1}))
    try:
        out, rows = compare(dvc_repo, monkeypatch)
    finally:
        params.write_text(before)
    assert sorted(r["experiment"] for r in rows) == ["cosine-exp", "main", "workspace"], out
    assert [r["experiment"] for r in rows if r["workspace"]] == ["workspace"]
