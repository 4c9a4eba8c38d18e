"""`python -m pipeline study run|report` on a real tiny DVC repository (a copy of ``reproduced``, whose
commit is one of the study's runs): a study of 2 experiments × 2 seeds follows the run an interruption
left in DVC's queue, runs its other 2 runs there and is reported with its verdicts (checked against the
experiments as `dvc exp show` has them and against scipy); a second `study run` does nothing, also after
a commit that changed no code, and an edit is stale exactly where DVC would re-run a stage; a run lost
after an interruption is all that runs again, restored from DVC's run-cache; a bad study file is one
line and queues nothing."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats
from test_e2e import sh
from tiny import cli

from helpers import REPO, copy_repository, e2e_params, new_repository, queue_env

TINY = """
description: A tiny study of the tests.
base:
  set: ['sample.samplers=[ddpm,ddim]', 'sample.steps=[3]']
seeds: [0, 1]
experiments:
  baseline: []
  trailing: [sample.spacing=trailing, 'sample.samplers=[ddim]']
claims:
  ddim:
    source: Song et al. 2021
    says: DDIM beats DDPM at 3 steps
    within: baseline
    compare: fid.ddim.3 < fid.ddpm.3
    notes:
      holds: DDIM {baseline fid.ddim.3} against DDPM {baseline fid.ddpm.3}.
      reversed: DDIM {baseline fid.ddim.3} against DDPM {baseline fid.ddpm.3}.
      not established: DDIM {baseline fid.ddim.3} against DDPM {baseline fid.ddpm.3}.
  trailing:
    source: Lin et al. 2024
    says: trailing spacing at least as good as linspace for DDIM at 3 steps
    metric: fid.ddim.3
    compare: trailing <= baseline
"""


def E2E(test):
    """Marks a test that runs `python -m pipeline study` and DVC (its queue, `dvc exp show`) in subprocesses."""
    return pytest.mark.slow(pytest.mark.e2e(test))


# the second experiment changes sampling only (and samples with DDIM alone, all its claim reads): its runs
# restore the baseline's training from DVC's run-cache. tiny-baseline-0 has the params of the repository's
# commit (``reproduced``): that commit is its run. tiny-baseline-1 is queued by hand before the study runs, as
# an interrupted `study run` leaves a run: the study follows it and queues the other two
NAMES = ["tiny-baseline-0", "tiny-baseline-1", "tiny-trailing-0", "tiny-trailing-1"]
QUEUED = NAMES[1:]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, reproduced):
    """A copy of ``reproduced`` (the tiny repository after `dvc repro`, committed), the study and a notes file
    added: its workspace is the study's baseline at seed 0, so that run restores every stage it has."""
    root = copy_repository(reproduced, tmp_path_factory.mktemp("study") / "repo")
    env = queue_env()
    notes = "# Notes\n\nbefore\n\n<!-- study tiny: begin -->\ntyped by hand\n<!-- study tiny: end -->\n\nafter\n"
    (root / "studies/tiny.yaml").write_text(TINY)
    (root / "NOTES.md").write_text(notes)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "the tiny study"], root, env)
    return root, env


@pytest.fixture(scope="module")
def bare(tmp_path_factory, idx_dir):
    """A tiny repository with the params of ``reproduced`` and nothing run: for the tests that queue nothing."""
    root = tmp_path_factory.mktemp("study-bare") / "repo"
    new_repository(root, e2e_params(idx_dir), queue_env())
    return root


def study(root, env, *args, timeout=1500):
    r = subprocess.run([sys.executable, "-m", "pipeline", "study", *args], cwd=root, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def queue_status(root, env) -> str:
    return sh(["dvc", "queue", "status"], root, env)


def experiments(root, env, commits: bool = False) -> dict[str, dict]:
    """Name → {params, metrics} of every experiment (and with ``commits``, of every branch's commit: "master"),
    read from `dvc exp show --json` here, not by the code under test."""
    show = json.loads(sh(["dvc", "exp", "show", "--json", "-A"], root, env))

    def entry(data: dict) -> dict:
        return {"params": data["params"]["params.yaml"]["data"],
                "fid": data["metrics"]["metrics/fid.json"]["data"]["fid"],
                "bpd": data["metrics"]["metrics/nll.json"]["data"]["nll"]["bits_per_dim"]}

    out = {}
    for commit in show:
        if commits and commit.get("name") and commit.get("rev") != "workspace":
            out[commit["name"]] = entry(commit["data"])
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                out[rev["name"]] = entry(rev.get("data") or {})
    return out


BAD = [
    ("experiments:\n  baseline: []\n  a: [schedul=cosine]\nseeds: [0]\n",
     "experiment a: unknown param key 'schedul'"),
    ("experiments:\n  a: [schedule=cosinus]\nseeds: [0]\n", "experiment a (seed 0): invalid params"),
    ("experiments:\n  a: []\n  b: [schedule=cosine]\nseeds: [0]\nclaims:\n  c:\n    source: x\n    says: y\n"
     "    metric: nll.bits_per_dim\n    compare: b <= nope\n", "claim c: experiment 'nope' is not in the study"),
    ("experiments:\n  a: []\nseeds: [0]\nclaims:\n  c:\n    source: x\n    says: y\n    within: a\n"
     "    compare: fid.ddim.7 < fid.ddpm.3\n", "claim c: unknown metric 'fid.ddim.7'"),
    ("experiments:\n  a: []\nseeds: [0]\nclaims:\n  c:\n    source: x\n    says: y\n    within: a\n"
     "    compare: fid.ddim.3 < nll.bpd\n", "claim c: unknown metric 'nll.bpd'"),
    ("experiments:\n  a: []\n  b: []\nseeds: [0]\nclaims:\n  c:\n    source: x\n    says: y\n    metric: fid.best\n"
     "    compare: a < b\n    notes:\n      holds: '{c fid.best}'\n", "note 'holds' names experiment 'c'"),
    ("experiments:\n  a: [seed=3]\nseeds: [0]\n", "experiment a sets seed"),
    ("experiments:\n  a: []\nseeds: []\n", "seeds: List should have at least 1 item"),
    ("base:\n  preset: gpu\nexperiments:\n  a: []\nseeds: [0]\n", "unknown preset 'gpu'"),
]


@pytest.mark.parametrize("text, naming", BAD)
def test_a_bad_study_file_is_one_line_and_queues_nothing(bare, text, naming):
    root = bare
    (root / "studies/bad.yaml").write_text(text)
    try:
        r = cli(root, "study", "run", "studies/bad.yaml")
    finally:
        (root / "studies/bad.yaml").unlink()
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: studies/bad.yaml") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert naming in r.stderr, r.stderr
    assert "queued" not in r.stdout


@E2E
def test_nothing_was_queued_by_the_bad_files_nor_by_a_dry_run(bare, repo):
    root, env = repo
    assert "Queued" not in queue_status(bare, env) and not experiments(bare, env)
    out = study(root, env, "run", "studies/tiny.yaml", "--dry")
    assert "1 done, 0 queued or running, 3 to queue" in out and out.count("would queue: dvc exp run --queue") == 3, out
    assert "tiny-baseline-0: done (DVC experiment master, " in out, out  # the commit's own results
    assert ("-n tiny-trailing-1 -S 'sample.samplers=[ddim]' -S 'sample.steps=[3]' -S sample.spacing=trailing "
            "-S seed=1") in out
    assert "Queued" not in queue_status(root, env) and not experiments(root, env)


def test_the_cpu_preset_is_read_from_the_makefile():
    from pipeline.experiments.study import StudyError, preset_overrides

    values = preset_overrides("cpu", REPO)
    text = (REPO / "Makefile").read_text()
    assert len(values) == re.search(r"CPU_PRESET :=(.*?)\n\n", text, re.S)[1].count("-S ")
    assert {"prediction=v", "model.attn_resolutions=[7]", "sample.steps=[10,20]"} <= set(values)
    with pytest.raises(StudyError, match="unknown preset 'gpu'"):
        preset_overrides("gpu", REPO)


@E2E
def test_a_tiny_study_runs_through_the_dvc_queue_and_reports_its_verdicts(repo):
    """Its commit is one run, one run waits in DVC's queue (queued by hand, as an interrupted `study run`
    leaves it): the study follows that one and queues the other two."""
    root, env = repo
    from pipeline.experiments.study import load

    adopted = next(r for r in load(root / "studies/tiny.yaml").runs if r.name == "tiny-baseline-1")
    sh(["dvc", "exp", "run", "--queue", "-n", adopted.name, *[a for o in adopted.overrides for a in ("-S", o)]],
       root, env)
    out = study(root, env, "run", "studies/tiny.yaml", "-j", "1", "--poll", "1")
    assert "study tiny: 4 runs (2 experiments × 2 seeds): 1 done, 1 queued or running, 2 to queue" in out, out
    assert all(f"queued {n}" in out for n in QUEUED[1:]) and "queued tiny-baseline-" not in out, out
    assert all(f"{n}: done in" in out for n in QUEUED), out
    assert "tiny-baseline-1: stage prepare unchanged from the baseline commit" in out, out
    assert "tiny-baseline-1: running stage train" in out and "[3/3]" in out
    assert "study tiny: 3 of 3 runs done in" in out, out
    assert set(experiments(root, env)) == set(QUEUED)
    exps = experiments(root, env, commits=True)
    exps["tiny-baseline-0"] = exps["master"]
    assert [(exps[n]["params"]["sample"]["spacing"], exps[n]["params"]["seed"]) for n in NAMES] == \
        [("linspace", 0), ("linspace", 1), ("trailing", 0), ("trailing", 1)]
    # shared stages: DVC's run-cache (tiny-baseline-1's training, for seed 1 with trailing spacing)
    assert "tiny-trailing-1: stage train restored from the run-cache" in out, out
    assert "tiny-trailing-0: stage train unchanged from the baseline commit" in out, out
    assert [exps[n]["params"]["sample"]["samplers"] for n in NAMES] == [["ddpm", "ddim"]] * 2 + [["ddim"]] * 2
    assert "tiny-baseline-1: running stage fid@ddpm-3" in out and not re.search(r"tiny-trailing-\d: .*ddpm-3", out), out

    out = study(root, env, "report", "studies/tiny.yaml", "--readme", "NOTES.md")
    doc = json.loads((root / "reports/study-tiny.json").read_text())
    assert doc["missing"] == [] and [r["dvc_experiment"] for r in doc["runs"]] == ["master", *QUEUED]
    ddim = [exps[n]["fid"]["ddim"]["3"] for n in NAMES[:2]]
    ddpm = [exps[n]["fid"]["ddpm"]["3"] for n in NAMES[:2]]
    trailing = [exps[n]["fid"]["ddim"]["3"] for n in NAMES[2:]]
    for claim, left, right in ((doc["claims"][0], ddim, ddpm), (doc["claims"][1], trailing, ddim)):
        ci = stats.ttest_ind(left, right, equal_var=False).confidence_interval(0.95)
        assert claim["difference"] == pytest.approx(sum(left) / 2 - sum(right) / 2, rel=1e-9)
        assert (claim["low"], claim["high"]) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
        expected = ("holds" if ci.high < 0 else "reversed" if ci.low > 0 else "not established")
        assert claim["verdict"] == expected, claim
        assert f"  {expected:>15}: {claim['text']}" in out, out
    baseline = next(e for e in doc["experiments"] if e["name"] == "baseline")
    assert baseline["n"] == 2 and baseline["stats"]["fid.ddim.3"]["values"] == ddim

    md = (root / "reports/study-tiny.md").read_text()
    assert "## Verdicts" in md and "![FID vs sampling steps per experiment](study-tiny-fid.png)" in md
    assert f"**{doc['claims'][0]['verdict']}**" in md and "| tiny-trailing-1 | trailing | 1 | tiny-trailing-1 |" in md
    assert (root / "reports/study-tiny-fid.png").stat().st_size > 1000
    assert "data:image/png;base64," in (root / "reports/study-tiny.html").read_text()
    notes = (root / "NOTES.md").read_text()
    assert notes.startswith("# Notes\n\nbefore\n\n<!-- study tiny: begin -->\n") and notes.endswith(
        "<!-- study tiny: end -->\n\nafter\n") and "typed by hand" not in notes
    assert "python -m pipeline study report studies/tiny.yaml --readme NOTES.md" in notes
    assert f"**DDIM beats DDPM at 3 steps (Song et al. 2021): {doc['claims'][0]['verdict']}.**" in notes
    assert re.search(r"DDIM \d\.\d+ ± \d\.\d+ against DDPM \d\.\d+ ± \d\.\d+\.", notes), notes  # the note, filled in

    # MLflow: one parent run of the study holding the three experiments' runs of the log stage (the commit's
    # own run, logged by `dvc repro` before there was a commit, is not found: the report says so)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    parents = mlflow.search_runs(experiment_names=["ddpm"], filter_string="tags.`study.name` = 'tiny'",
                                 output_format="list")
    assert len(parents) == 1 and parents[0].data.tags["claim.trailing.verdict"] == doc["claims"][1]["verdict"]
    children = mlflow.search_runs(experiment_names=["ddpm"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(c.data.tags["dvc.exp_name"] for c in children) == QUEUED
    assert "holding the runs of 3 experiments as children; no MLflow run found for master" in out, out
    assert "already there" in study(root, env, "report", "studies/tiny.yaml")  # the same report: logged once


@E2E
def test_a_second_run_does_nothing_also_after_a_commit_that_changes_no_code(repo, monkeypatch):
    root, env = repo
    before = queue_status(root, env)
    out = study(root, env, "run", "studies/tiny.yaml")
    assert "4 done, 0 queued or running, 0 to queue" in out and "study tiny: nothing to run" in out, out
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "the report"], root, env)
    out = study(root, env, "run", "studies/tiny.yaml")
    assert "4 done, 0 queued or running, 0 to queue" in out and "nothing to run" in out, out
    assert queue_status(root, env) == before

    # a run is stale when one of its stages would run again: an edit of a command that is no stage leaves
    # every run done, an edit of the sampler or of the report stage alone makes every run stale (that DVC then
    # re-runs the report alone, restoring the rest: test_e2e's test_an_edit_of_the_unet_keeps_the_ruler_and_the_data)
    from pipeline.experiments import study_queue
    from pipeline.experiments.study import load, match

    monkeypatch.chdir(root)
    plan = load(Path("studies/tiny.yaml"))
    assert len(match(plan, study_queue.exp_show(), study_queue.current_check())) == 4
    for path, found in (("pipeline/experiments/compare.py", 4), ("ddpm/samplers.py", 0),
                        ("pipeline/stages/report.py", 0)):
        source = (root / path).read_text()
        (root / path).write_text(source + "# an edit\n")
        try:
            assert len(match(plan, study_queue.exp_show(), study_queue.current_check())) == found, path
        finally:
            (root / path).write_text(source)


@E2E
def test_a_rerun_after_an_interruption_does_only_what_is_missing(repo):
    """A run lost (its experiment removed): the next `study run` queues it alone, and DVC's run-cache
    restores every stage of it, with the same metrics. (A run left in the queue is followed, not queued again:
    the tiny study.)"""
    root, env = repo
    before = experiments(root, env)["tiny-trailing-1"]
    sh(["dvc", "exp", "remove", "tiny-trailing-1"], root, env)
    out = study(root, env, "run", "studies/tiny.yaml", "--poll", "1")
    assert "3 done, 0 queued or running, 1 to queue" in out and "queued tiny-trailing-1" in out, out
    assert "tiny-trailing-1: stage train restored from the run-cache" in out, out
    assert "1 of 1 run done" in out and "every stage of 1" in out, out
    assert experiments(root, env)["tiny-trailing-1"] == before  # its params and metrics, restored
    assert "nothing to run" in study(root, env, "run", "studies/tiny.yaml")


@E2E
def test_a_run_that_fails_is_named_with_its_error(repo):
    """A value the check stage accepts that makes training diverge: the run fails in DVC's queue."""
    root, env = repo
    (root / "studies/fails.yaml").write_text("base:\n  set: ['sample.samplers=[ddpm]', 'sample.steps=[3]']\n"
                                              "experiments:\n  boom: [train.lr=1.0e+30]\nseeds: [0]\n")
    r = subprocess.run([sys.executable, "-m", "pipeline", "study", "run", "studies/fails.yaml", "--poll", "1"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stdout + r.stderr
    diverged = r"became (non-finite|nan|inf)"
    assert "fails-boom-0: FAILED (error: " in r.stdout and re.search(diverged, r.stdout), r.stdout
    assert r.stderr.startswith("error: 1 of 1 experiments failed: fails-boom-0 (error: ") \
        and re.search(diverged, r.stderr) and len(r.stderr.strip().splitlines()) == 1, r.stderr


HOLDS = """
import os
from pipeline.experiments import dvc_api
read, write = os.pipe()
stdout = os.dup(1)
os.dup2(write, 1)
os.close(write)
dvc_api.start_workers(1)
os.dup2(stdout, 1)  # the pipe's write end is now held by whatever inherited it, if anything
os.set_blocking(read, False)
try:
    print("eof" if os.read(read, 1024) == b"" else "data")
except BlockingIOError:
    print("held")
"""


@pytest.mark.slow
def test_the_queue_workers_hold_no_pipe_of_the_study(tmp_path):
    """DVC forks a daemon per queue worker that lives as long as the worker (until some seconds after the
    queue empties): it must not inherit `study run`'s stdout, else a pipe reading it (`| tee`, this suite's
    capture) stays open that long after the study ended."""
    env = {**queue_env(), "PYTHONPATH": str(REPO)}
    sh(["git", "init", "-q"], tmp_path, env)
    sh(["dvc", "init", "-q"], tmp_path, env)
    sh(["git", "commit", "-qm", "dvc"], tmp_path, env)
    r = subprocess.run([sys.executable, "-c", HOLDS], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "eof", r.stdout + r.stderr


def test_a_follower_names_the_experiment_that_failed(tmp_path):
    from pipeline.experiments.study_queue import Follower

    log = tmp_path / "a.out"
    log.write_text("Running stage 'check':\nStage 'prepare' is cached - skipping run, checking out outputs\n"
                   "Running stage 'train':\nerror: training diverged at step 7 (loss nan)\n"
                   "ERROR: failed to reproduce 'train': failed to run: python -m pipeline train, exited with 1\n")
    lines, clock = [], iter(range(0, 1000, 5))
    f = Follower({"s-a-0": "rev-a", "s-b-0": "rev-b"}, echo=lines.append, clock=lambda: next(clock))
    f.update({"rev-a": "running", "rev-b": "queued"}, {"rev-a": str(log)})
    f.update({"rev-a": "failed", "rev-b": "running"}, {"rev-a": str(log)})
    f.update({"rev-b": "success"}, {})
    assert any("s-a-0: stage prepare restored from the run-cache" in line for line in lines), lines
    assert any("s-a-0: FAILED (error: training diverged at step 7 (loss nan)) [1/2]" in line for line in lines), lines
    assert any("s-b-0: done in" in line and "[2/2]" in line for line in lines), lines
    assert f.finished() and f.state == {"s-a-0": "failed", "s-b-0": "success"}


def test_a_study_measured_with_two_rulers_is_refused():
    """The runs of one study whose FIDs come from different rulers: no mean, no verdict, one line naming them."""
    from types import SimpleNamespace

    from pipeline.experiments.study import StudyError
    from pipeline.experiments.study_report import check_rulers

    rows = {"s-a-0": {"ruler": "aaaaaaaaaaaa"}, "s-a-1": {"ruler": "aaaaaaaaaaaa"}, "s-b-0": {"ruler": "bbbbbbbbbbbb"}}
    with pytest.raises(StudyError, match=r"2 different rulers \(aaaaaaaaaaaa: s-a-0, s-a-1; bbbbbbbbbbbb: s-b-0\)"):
        check_rulers(SimpleNamespace(name="s"), rows)
    check_rulers(SimpleNamespace(name="s"), {k: v for k, v in rows.items() if k != "s-b-0"})
