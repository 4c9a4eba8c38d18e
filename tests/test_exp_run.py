"""`dvc exp run` and the sample matrix, on a real tiny DVC repository (issue 22, item 2).

`dvc exp run` checks out the pipeline as its new params expand it before any stage runs, and
that checkout deletes the outputs of the matrix cells that left it: a `-S` typo in
`sample.samplers` or `sample.steps` cost results although the `check` stage refused it.
`python -m pipeline exp-run` checks the params with the overrides applied first and leaves the
workspace as it was; what DVC itself still does, and how `dvc checkout` restores it, is pinned
down here too (the README's failure-and-recovery section says the same)."""

import json
import re
import subprocess
import sys

import pytest
import yaml
from test_e2e import outputs, sh

from helpers import e2e_params, new_repository, queue_env

pytestmark = pytest.mark.slow  # a real DVC repository and `dvc exp run` in subprocesses


@pytest.fixture(scope="module")
def repo(tmp_path_factory, idx_dir):
    """A copy of the repository whose cells samples/ddpm-3 and samples/ddim-3 were produced by
    `dvc repro sample` (and committed), with timesteps 100."""
    root = tmp_path_factory.mktemp("exp-run") / "repo"
    env = queue_env()
    new_repository(root, e2e_params(idx_dir), env)
    sh(["dvc", "repro", "sample"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "two cells"], root, env)
    assert {"samples/ddpm-3/samples.pt", "samples/ddim-3/samples.pt", "samples/ddim-3/info.json"} <= outputs(root).keys()
    return root, env


def run(root, env, *args):
    return subprocess.run(list(args), cwd=root, env=env, capture_output=True, text=True, timeout=600)


def experiments(root, env) -> int:
    show = json.loads(sh(["dvc", "exp", "show", "--json"], root, env))
    return sum(len(c.get("experiments") or []) for c in show)


@pytest.mark.parametrize("override, naming", [
    ("sample.samplers=[ddpm,nope]", "sample.samplers names ['nope'], not defined under 'samplers'"),
    ("sample.steps=[200]", "sample.steps [200] must lie in [1, timesteps=100]"),
    ("sample.steps=[3", "invalid -S override in 'sample.steps=[3'"),
])
def test_exp_run_refuses_a_bad_matrix_value_before_dvc_touches_anything(repo, override, naming):
    root, env = repo
    before, params, exps = outputs(root), (root / "params.yaml").read_text(), experiments(root, env)
    r = run(root, env, sys.executable, "-m", "pipeline", "exp-run", "-S", override)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: "), r.stderr
    assert naming in r.stderr, r.stderr
    assert "Running stage" not in r.stdout  # DVC never started
    assert outputs(root) == before and (root / "params.yaml").read_text() == params
    assert sorted(p.name for p in (root / "samples").iterdir()) == ["ddim-3", "ddpm-3"]  # no empty new cell
    assert experiments(root, env) == exps


def test_exp_run_checks_every_experiment_of_a_queued_sweep(repo):
    root, env = repo
    before = outputs(root)
    r = run(root, env, sys.executable, "-m", "pipeline", "exp-run", "--queue", "-S", "sample.seed=1,2",
            "-S", "timesteps=100,2")
    assert r.returncode == 1 and "timesteps=2" in r.stderr and "sample.steps [3] must lie in [1, timesteps=2]" \
        in r.stderr, r.stdout + r.stderr
    assert "Queued" not in r.stdout and outputs(root) == before
    assert "Queued" not in sh(["dvc", "queue", "status"], root, env)  # none of the sweep was queued


def test_what_dvc_exp_run_itself_deletes_and_dvc_checkout_restores(repo):
    """DVC's own behaviour, documented in the README: without the wrapper the typo deletes the cell
    that leaves the matrix (the check stage then fails), and `dvc checkout` with the committed
    params.yaml restores it byte for byte from DVC's cache."""
    root, env = repo
    before = outputs(root)
    r = run(root, env, "dvc", "exp", "run", "-S", "sample.samplers=[ddpm,nope]")
    assert r.returncode != 0 and "error: invalid params in params.yaml" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not (root / "samples/ddim-3/samples.pt").exists(), "DVC no longer deletes the cell: update the README"
    assert (root / "samples/nope-3").is_dir() and not any((root / "samples/nope-3").iterdir())  # and makes an empty one
    sh(["git", "checkout", "params.yaml"], root, env)
    sh(["dvc", "checkout", "--allow-missing"], root, env)  # only `sample` and what it needs ran here
    assert outputs(root) == before


def test_exp_run_passes_valid_arguments_to_dvc(repo):
    root, env = repo
    r = run(root, env, sys.executable, "-m", "pipeline", "exp-run", "sample", "-S", "sample.seed=5")
    assert r.returncode == 0, r.stdout + r.stderr
    # named for what it changes, so that the first column of `dvc exp show` says it
    assert "exp-run: 1 set of params passed the check stage's checks; running dvc exp run -n sample.seed=5 sample " \
        "-S sample.seed=5" in r.stdout
    assert "Ran experiment(s): sample.seed=5" in r.stdout
    assert set(re.findall(r"Running stage '([^']+)'", r.stdout)) == {"check", "sample@ddpm-3", "sample@ddim-3"}
    assert yaml.safe_load((root / "params.yaml").read_text())["sample"]["seed"] == 5


def test_dvc_warnings_for_outputs_without_results_are_one_line(tmp_path):
    """`dvc exp run` in a workspace without dvc.lock (a fresh clone: `make repro`) first checks out every output
    and warns for each that it has no hash of (about 80 lines for the pipeline); through exp-run's DVC
    (``dvc_api.run_cli``) one note says what they mean. Here a stage with five outputs."""
    from helpers import REPO

    env = {**queue_env(), "PYTHONPATH": str(REPO)}
    sh(["git", "init", "-q"], tmp_path, env)
    sh(["dvc", "init", "-q"], tmp_path, env)
    outs = [f"out{i}.txt" for i in range(5)]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": "python -c \"import pathlib; [pathlib.Path(f'out{i}.txt').write_text(str(i)) for i in range(5)]\"",
        "outs": outs}}}))
    sh(["git", "add", "-A"], tmp_path, env)
    sh(["git", "commit", "-qm", "five outputs"], tmp_path, env)
    plain = run(tmp_path, env, "dvc", "exp", "run", "-n", "plain")
    assert plain.returncode == 0 and (plain.stdout + plain.stderr).count("No file hash info found for") == 5, plain.stderr
    sh(["git", "checkout", "-q", "--", "."], tmp_path, env)
    for f in outs + ["dvc.lock"]:
        (tmp_path / f).unlink(missing_ok=True)
    folded = run(tmp_path, env, sys.executable, "-m", "pipeline.experiments.dvc_api", "exp", "run", "-n", "folded")
    text = folded.stdout + folded.stderr
    assert folded.returncode == 0 and "Ran experiment(s): folded" in text, text
    assert "No file hash info found for" not in text and text.count("note: this workspace has no recorded results") == 1
