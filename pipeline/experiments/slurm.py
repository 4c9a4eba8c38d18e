"""A study's runs as SLURM jobs: ``python -m pipeline study run <file> --executor slurm``.

DVC's queue runs local workers only, and DVC has no cluster executor (treeverse/dvc#7419). Here
**each experiment × seed is one SLURM job** (``sbatch``), which runs ``dvc exp run`` in a clone of
its own: ``.dvc/tmp/slurm/<study>/<run>/``, a ``git clone --shared`` of this repository checked out
at HEAD (the jobs run committed code: uncommitted changes of tracked files are refused), whose DVC
cache is this repository's (``cache.dir``: outputs and the run-cache are shared, so a stage another
run already computed is restored, not recomputed). Every job logs to this repository's MLflow
database and shares its compile cache.

**Results come home.** When ``dvc exp run`` has finished, the job pushes the experiment to this
repository (``dvc exp push --no-cache origin <run>``: a git ref under ``refs/exps``; the outputs
are in the shared cache already). ``dvc exp show``, ``study report`` and MLflow then see it like an
experiment run here.

**Following and recovery.** ``study run`` follows its jobs (squeue; ``sacct`` for finished ones, or
``sacct -c``, SLURM's job-completion log, where accounting is disabled) with a line per change:
pending, running, each stage as it starts or is restored (from the job's log), done, failed,
timed out, cancelled. A failed job is named with the last error lines of its log. The jobs a run
submitted are recorded in ``.dvc/tmp/slurm/<study>/jobs.json``: a second ``study run`` follows those
still pending or running and submits only what is missing, failed or was cancelled. Ctrl-C cancels
what this run submitted (``scancel``) and says so.

**Preemption and time limits.** SLURM sends SIGTERM before it kills a job (``--signal=B:TERM@<s>``
here, for the time limit; preemption and ``scancel`` send it too): the batch script hands it to the
job's processes, and `train` writes its resume state in the clone before it stops. The clone is
kept, so the job submitted again (by the next ``study run``, or by SLURM's requeue) resumes training
from that state instead of starting over.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ddpm.errors import InputError
from pipeline.errors import ExternalError
from pipeline.progress import format_seconds

# SLURM's job states → what a study calls them
STATES = {"PENDING": "pending", "REQUEUED": "pending", "CONFIGURING": "running", "RUNNING": "running",
          "COMPLETING": "running", "SUSPENDED": "running", "COMPLETED": "done", "FAILED": "failed",
          "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "timed out",
          "TIMEOUT": "timed out", "CANCELLED": "cancelled", "PREEMPTED": "cancelled", "REVOKED": "cancelled"}
FINISHED = ("done", "failed", "timed out", "cancelled")
TERM_SECONDS = 120  # SIGTERM this long before the time limit: time for train to write its resume state


@dataclass(frozen=True)
class Resources:
    """What a job asks SLURM for (``slurm:`` in the study file, or ``study run`` options)."""
    partition: str | None = None
    gpus: int = 0  # --gres=gpu:N (train and sample use every GPU of their job: pipeline.launch)
    cpus: int = 1  # --cpus-per-task
    time: str | None = None  # --time, SLURM's format: minutes, H:MM:SS or D-HH:MM:SS
    account: str | None = None
    mem: str | None = None  # --mem, e.g. 16G

    def options(self) -> list[str]:
        out = [f"--cpus-per-task={self.cpus}"]
        out += [f"--partition={self.partition}"] if self.partition else []
        out += [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        out += [f"--time={self.time}", f"--signal=B:TERM@{TERM_SECONDS}"] if self.time else []
        out += [f"--account={self.account}"] if self.account else []
        out += [f"--mem={self.mem}"] if self.mem else []
        return out


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise ExternalError(f"{args[0]} is not installed here: --executor slurm needs SLURM's commands "
                            "(sbatch, squeue, sacct, scancel) on PATH") from None


def _git(root: Path, *args: str) -> str:
    r = _run(["git", "-C", str(root), *args])
    if r.returncode:
        raise ExternalError(f"git {' '.join(args)} failed in {root}: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip()


def home(root: Path, study: str) -> Path:
    return root / ".dvc" / "tmp" / "slurm" / study


def check_clean(root: Path) -> str:
    """HEAD's commit, once the tracked files are as HEAD has them (the jobs run HEAD)."""
    changed = _git(root, "status", "--porcelain", "--untracked-files=no")
    if changed:
        files = ", ".join(line[3:] for line in changed.splitlines()[:5])
        raise InputError(f"the SLURM jobs run the committed code (HEAD), and tracked files differ from it ({files}"
                         f"{', …' if len(changed.splitlines()) > 5 else ''}): commit or stash them first")
    return _git(root, "rev-parse", "HEAD")


def prepare_clone(root: Path, clone: Path, rev: str) -> None:
    """``clone``: a ``git clone --shared`` of ``root`` at ``rev`` whose DVC cache is ``root``'s (made once,
    then kept: a job submitted again finds its resume state there)."""
    if not (clone / ".git").is_dir():
        clone.parent.mkdir(parents=True, exist_ok=True)
        r = _run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(root), str(clone)])
        if r.returncode:
            raise ExternalError(f"git clone {root} {clone} failed: {r.stderr.strip()}")
    _git(clone, "fetch", "--quiet", "origin", rev)
    _git(clone, "checkout", "--quiet", "--force", "--detach", rev)
    (clone / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {(root / '.dvc' / 'cache').resolve()}\n")


def script(run, clone: Path, root: Path, resources: Resources, tracking_uri: str) -> str:
    """The batch script of one run: ``dvc exp run`` in its clone, then the experiment pushed home. SIGTERM
    (a time limit's, a preemption's, ``scancel``) goes to every process of the job."""
    overrides = " ".join(shlex.quote(a) for o in run.overrides for a in ("-S", o))
    python = shlex.quote(sys.executable)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={run.name}", f"#SBATCH --output={clone}/slurm-%j.out",
             "#SBATCH --open-mode=append", *(f"#SBATCH {o}" for o in resources.options()),
             "set -uo pipefail", f"cd {shlex.quote(str(clone))}",
             f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
             f"export MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)}",
             f"export TORCHINDUCTOR_CACHE_DIR={shlex.quote(str(root / '.cache' / 'torchinductor'))}",
             # SIGTERM of the batch shell alone (--signal=B:TERM, before the time limit) goes to the run too
             'trap \'kill -TERM -- -"$run" 2>/dev/null; wait "$run"\' TERM',
             f'echo "slurm: job $SLURM_JOB_ID of {run.name} on $(hostname) at $(date -u +%FT%TZ)"',
             f"{python} -m dvc exp remove {shlex.quote(run.name)} >/dev/null 2>&1",
             f"setsid {python} -m dvc exp run -n {shlex.quote(run.name)} {overrides} &", "run=$!",
             'wait "$run"; status=$?', '[ "$status" -eq 0 ] || exit "$status"',
             f"{python} -m dvc exp push --force --no-cache origin {shlex.quote(run.name)}"]
    return "\n".join(lines) + "\n"


def submit(path: Path, env: dict) -> str:
    r = _run(["sbatch", "--parsable", str(path)], env=env)
    if r.returncode:
        raise ExternalError(f"sbatch {path} failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip().split(";")[0]


def states(ids: list[str], env: dict) -> dict[str, str]:
    """Job id → SLURM's state (its first word), for the jobs SLURM still knows: squeue, then sacct (or
    ``sacct -c`` where accounting is disabled) for those that left the queue."""
    out: dict[str, str] = {}
    if not ids:
        return out
    r = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], env=env)
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        job, state = line.split()[:2]
        out[job] = state
    rest = [i for i in ids if i not in out]
    for args in (["sacct"], ["sacct", "-c"]):
        if not rest:
            break
        r = _run([*args, "-n", "-P", "-X", "-j", ",".join(rest), "-o", "JobID,State"], env=env)
        if r.returncode:
            continue
        for line in r.stdout.splitlines():
            job, state = (line.split("|") + [""])[:2]
            if job in rest and state:
                out[job] = state.split()[0]  # "CANCELLED by 0" → CANCELLED
        rest = [i for i in ids if i not in out]
    return out


def cancel(ids: list[str], env: dict) -> None:
    if ids:
        _run(["scancel", *ids], env=env)


def last_lines(log: Path, n: int = 3) -> str:
    """The error lines at the end of a job's log (the stage's own ``error:``, DVC's ``ERROR:``), else its last lines."""
    if not log.is_file():
        return "no log"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^(ERROR|error)\b", line)]
    return " | ".join((errors or lines)[-n:]) or "an empty log"


def record(folder: Path) -> dict:
    path = folder / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run(study, todo: list, resources: Resources, poll: float, tracking_uri: str | None, experiment: str,
        root: Path = Path(".")) -> None:
    """Submit ``todo`` (runs not done) as SLURM jobs, adopting those still pending or running from an earlier
    ``study run``, and follow them all until they finish; raises naming each that did not succeed."""
    from pipeline.experiments.study import plural
    from pipeline.experiments.study_queue import Follower
    from pipeline.tracking.study import ensure_database
    from pipeline.tracking.client import default_tracking_uri

    root = root.resolve()
    rev = check_clean(root)
    uri = tracking_uri or default_tracking_uri()
    ensure_database(uri, experiment)  # once, before parallel jobs would create it at once
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    folder = home(root, study.name)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = record(folder)
    known = states([earlier[r.name] for r in todo if r.name in earlier], env)
    jobs, submitted = {}, []
    for r in todo:
        job = earlier.get(r.name)
        if job and STATES.get(known.get(job, ""), "") in ("pending", "running"):
            jobs[r.name] = job
            print(f"  {r.name}: job {job} is {STATES[known[job]]} (submitted earlier): following it", flush=True)
            continue
        clone = folder / r.name
        prepare_clone(root, clone, rev)
        path = clone / "job.sh"
        path.write_text(script(r, clone, root, resources, uri))
        jobs[r.name] = submit(path, env)
        submitted.append(jobs[r.name])
        (folder / "jobs.json").write_text(json.dumps({**earlier, **jobs}, indent=2, sort_keys=True) + "\n")
        print(f"  submitted {r.name}: SLURM job {jobs[r.name]}", flush=True)
    (folder / "meta.json").write_text(json.dumps({"rev": rev, "resources": asdict(resources)}, indent=2) + "\n")
    logs = {job: str(folder / name / f"slurm-{job}.out") for name, job in jobs.items()}
    follower = Follower({name: job for name, job in jobs.items()}, echo=lambda s: print(s, flush=True))
    print(f"study {study.name}: {plural(len(jobs), 'run')} as SLURM jobs ({', '.join(jobs.values())}; squeue; "
          f"their logs: {folder}/<run>/slurm-<job>.out)", flush=True)
    seen: dict[str, str] = {}
    said: set[str] = set()
    try:
        while not follower.finished():
            time.sleep(poll)
            seen.update(states(list(jobs.values()), env))
            view = {job: {"pending": "queued", "running": "running", "done": "success"}.get(STATES.get(s, ""), "failed")
                    for job, s in seen.items() if STATES.get(s)}
            for name, job in jobs.items():  # a job SLURM stopped says so (a failed one: its log's error line)
                if view.get(job) == "failed" and name not in said and STATES[seen[job]] != "failed":
                    said.add(name)
                    follower.errors.setdefault(name, []).insert(0, f"error: {STATES[seen[job]]} (SLURM job {job})")
            follower.update(view, logs)
            for name, job in jobs.items():
                if follower.state[name] == "failed" and not follower.errors.get(name):
                    follower.errors[name] = [f"error: {last_lines(Path(logs[job]))} (SLURM job {job})"]
    except KeyboardInterrupt:
        mine = [job for job in submitted if STATES.get(seen.get(job, "PENDING"), "pending") not in FINISHED]
        cancel(mine, env)
        print(f"\nstudy run: cancelled the {plural(len(mine), 'SLURM job')} this run submitted "
              f"({', '.join(mine) or 'none left'}); `study run` again submits them anew", flush=True)
        raise SystemExit(130) from None
    failed = [n for n in jobs if follower.state[n] == "failed"]
    print(f"study {study.name}: {len(jobs) - len(failed)} of {plural(len(jobs), 'run')} done on SLURM in "
          f"{format_seconds(follower.clock() - follower.start)}", flush=True)
    if failed:
        raise ExternalError(f"{len(failed)} of {len(jobs)} SLURM jobs failed: "
                            + "; ".join(f"{n} ({follower.error(n)})" for n in failed)
                            + f" (their logs: {folder}/<run>/slurm-<job>.out)")

