"""Studies on a real SLURM cluster (tests/slurm_cluster.py: slurmctld and slurmd on this machine), no
mock: a study's run through SLURM trains the weights of an uninterrupted training of the same params here,
also when its job is cancelled mid-training and submitted again by the next `study run` (it resumes), and
comes home with its metrics; a failing job is named with its error, Ctrl-C cancels what the run
submitted, and training as two srun tasks equals one process."""

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import start, stop, unavailable
from tiny import cli, max_abs_diff, subprocess_env, weights, workspace

from helpers import copy_repository, queue_env, sh

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""),
              pytest.mark.usefixtures("one_thread")]  # the trainings in process: one thread, as the jobs' stages

STUDY = "base:\n  set: ['sample.samplers=[ddpm]', 'sample.steps=[3]']\nexperiments:\n  base: []\nseeds: {seeds}\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    env = start(folder)
    yield env
    subprocess.run(["scancel", "-u", "root"], env=env, capture_output=True)
    stop(folder)


@pytest.fixture(scope="module")
def repos(tmp_path_factory, cluster, reproduced):
    """A copy of ``reproduced`` (the tiny repository after `dvc repro`, committed: its data, classifier and FID
    reference are restored in the jobs, not made again) with its studies in studies/, committed; and a folder
    for the training here."""
    root = tmp_path_factory.mktemp("slurm-repos")
    remote = copy_repository(reproduced, root / "slurm")
    long = "long: [train.steps=400, train.ema_snapshot_every=100]"  # a train long enough to be cancelled in
    files = {"studies/one.yaml": STUDY.format(seeds="[0]").replace("base: []", long),
             "studies/stop.yaml": STUDY.format(seeds="[9]"),
             "studies/fails.yaml": STUDY.format(seeds="[0]").replace("base: []", "boom: [train.lr=1.0e+30]")}
    for f, text in files.items():
        (remote / f).write_text(text)
    env = {**queue_env(), "SLURM_CONF": cluster["SLURM_CONF"]}
    sh(["git", "add", "-A"], remote, env)
    sh(["git", "commit", "-qm", "the studies"], remote, env)
    return root / "local", remote, env


def train_here(local: Path, remote: Path, overrides: list[str]) -> Path:
    """`python -m pipeline train` in this process (on one thread: ``one_thread``), on the data of ``remote``
    with its params.yaml and ``overrides`` applied as `dvc exp run -S` applies them: the model an uninterrupted
    training of the run writes."""
    from pipeline.experiments.dvc_api import apply_overrides

    shutil.copytree(remote / "data/prepared", local / "data/prepared")
    shutil.copyfile(remote / "params.yaml", local / "params.yaml")
    apply_overrides(local / "params.yaml", overrides)
    r = cli(local, "train", "--device", "cpu", "--no-live")
    assert r.exit_code == 0, r.output
    return local / "models/model.pt"


def study(root: Path, env: dict, *args: str, code: int = 0) -> str:
    r = subprocess.run([sys.executable, "-m", "pipeline", "study", *args], cwd=root, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == code, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def experiments(root: Path, env: dict) -> dict[str, dict]:
    """Experiment name → its `data` in `dvc exp show --json` (params, metrics, outs with their md5)."""
    return {rev["name"]: rev["data"] for commit in json.loads(sh(["dvc", "exp", "show", "--json", "-A"], root, env))
            for exp in commit.get("experiments") or [] for rev in exp.get("revs") or []}


def wait_for(predicate, seconds: float = 120):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if (found := predicate()):
            return found
        time.sleep(0.5)
    raise AssertionError("timed out waiting")


def final_state(job: str, env: dict) -> str:
    """The job's final state from SLURM's job-completion log ("" while it runs)."""
    return subprocess.run(["sacct", "-c", "-n", "-P", "-j", job, "-o", "State"], env=env, capture_output=True,
                          text=True).stdout.strip()


def job_of(root: Path, study_name: str, run: str) -> str | None:
    path = root / ".dvc/tmp/slurm" / study_name / "jobs.json"
    return json.loads(path.read_text()).get(run) if path.is_file() else None


def test_a_study_through_slurm_trains_like_a_local_run_also_after_a_cancel(repos, figure):
    """The study's run as a SLURM job, cancelled mid-training (`scancel`: SIGTERM, as a preemption sends):
    train writes its resume state in the run's clone, the next `study run` submits the run again, its job
    resumes training from that state, and the experiment that comes home has the weights of an
    uninterrupted training of the same params in this process (`train_here`: the same md5) and
    every metric of the pipeline. (That the stages after train give the same results from the same weights
    is test_e2e's and test_study's: the run-cache restores them.)"""
    from pipeline.experiments.study import load

    local, remote, env = repos
    start_time = time.perf_counter()
    overrides = next(r.overrides for r in load(remote / "studies/one.yaml").runs if r.name == "one-long-0")
    model = train_here(local, remote, overrides)
    local_seconds = time.perf_counter() - start_time
    start_time = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "study", "run", "studies/one.yaml", "--executor",
                          "slurm", "--poll", "1"], cwd=remote, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    job = wait_for(lambda: job_of(remote, "one", "one-long-0"))
    clone = remote / ".dvc/tmp/slurm/one/one-long-0"
    log = clone / f"slurm-{job}.out"
    # train's estimate of its time: printed after its first steps, some seconds before the 400th
    wait_for(lambda: log.is_file() and re.search(r"^train: .*estimated total", log.read_text(), re.M), 300)
    subprocess.run(["scancel", job], env=env, check=True)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 1 and f"one-long-0 (error: cancelled (SLURM job {job}))" in out, out
    assert list((clone / "checkpoints").glob("train-*.pt")), log.read_text()[-3000:]  # the resume state

    out = study(remote, env, "run", "studies/one.yaml", "--executor", "slurm", "--poll", "1")
    slurm_seconds = time.perf_counter() - start_time
    assert "0 done" in out and "submitted one-long-0" in out and "1 of 1 run done on SLURM" in out, out
    assert "one-long-0: running stage train" in out, out  # the job's stages, from its log
    again = job_of(remote, "one", "one-long-0")
    assert again != job and "train: resuming from step" in (clone / f"slurm-{again}.out").read_text()
    there = experiments(remote, env)
    assert set(there) == {"one-long-0"}, there.keys()
    there = there["one-long-0"]
    assert there["params"]["params.yaml"]["data"] == yaml.safe_load((local / "params.yaml").read_text())
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    assert there["outs"]["models/model.pt"]["hash"] == md5, md5  # resumed on SLURM = uninterrupted here, bit for bit
    metrics = there["metrics"]
    fid, bpd = metrics["metrics/fid.json"]["data"]["fid"]["ddpm"]["3"], metrics["metrics/nll.json"]["data"]["nll"]
    assert fid > 0 and bpd["bits_per_dim"] > 0, metrics
    figure(f"slurm: a 1-run study in {slurm_seconds:.0f} s as SLURM jobs (cancelled, then resumed), its weights "
           f"those of an uninterrupted training here ({local_seconds:.0f} s, in process) (this machine, shared with "
           "the other tests)")
    # the experiment came home: done, also for `study report`
    assert "1 done, 0 queued or running, 0 to queue" in study(remote, env, "run", "studies/one.yaml", "--executor",
                                                              "slurm", "--dry")
    assert "study report:" in study(remote, env, "report", "studies/one.yaml")


def test_a_failing_job_is_named_with_its_error(repos):
    _, remote, env = repos
    out = study(remote, env, "run", "studies/fails.yaml", "--executor", "slurm", "--poll", "1", code=1)
    assert "1 of 1 SLURM jobs failed: fails-boom-0 (error: training loss became inf" in out, out


def test_ctrl_c_cancels_what_the_run_submitted(repos):
    _, remote, env = repos
    # Ctrl-C's default action in the child, also where the test run itself ignores SIGINT (started in the background)
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "study", "run", "studies/stop.yaml", "--executor",
                          "slurm", "--poll", "1"], cwd=remote, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    job = wait_for(lambda: job_of(remote, "stop", "stop-base-9"))
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130 and f"cancelled the 1 SLURM job this run submitted ({job})" in out, out
    state = wait_for(lambda: final_state(job, env), 60)
    assert state.startswith("CANCELLED"), state


def test_two_srun_tasks_train_like_one_process(tmp_path, cluster):
    """Multi-node training reads its rendezvous from SLURM (pipeline.launch.from_slurm): two tasks of one
    job, here on the one local node, train the model one process trains with the same global batch."""
    root = workspace(tmp_path, steps=6, batch_size=8, checkpoint_every=0)
    assert cli(root, "train", "--device", "cpu", "--out", "models/one.pt", "--metrics", "metrics/one.json").exit_code == 0
    env = {**subprocess_env(), "SLURM_CONF": cluster["SLURM_CONF"], "PIPELINE_LIVE_MLFLOW": "0"}
    command = (f"srun {sys.executable} -m pipeline.stages.train --device cpu --out models/two.pt "
               "--metrics metrics/two.json --no-live")
    # not `sbatch --wait`: it polls at 2, 6, 14, 30 s..., so a job of 15 s would keep the test 30 s
    job = subprocess.run(["sbatch", "--parsable", "--ntasks=2", f"--chdir={root}", "--output=srun.out", "--wrap",
                          command], env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    state = wait_for(lambda: final_state(job, env), 600)
    log = (root / "srun.out").read_text() if (root / "srun.out").is_file() else ""
    assert state == "COMPLETED", state + log
    assert "(2 processes)" in log and log.count("train: 6 steps") == 1, log
    assert max_abs_diff(weights(root / "models/one.pt"), weights(root / "models/two.pt")) < 1e-4
