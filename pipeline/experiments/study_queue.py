"""A study's runs in DVC's queue (``python -m pipeline study run``): which experiments a study may
reuse, queueing the others, and following the queue (every DVC call through
``pipeline.experiments.dvc_api``).

**Reuse.** The experiments read are those of HEAD and of every commit that has experiments
(``refs/exps``), so a study's runs still count after a commit that changed no code (the README
the report regenerates). An experiment is current when none of its stages would run again with
today's code and dvc.yaml (``dvc_api.stale_stages``): an edit that reaches no stage of it (a
command that is no stage, the README, a comment in dvc.yaml) leaves it done; an edit of the
report makes it stale, and running it again re-runs the report stages only (the rest comes from
DVC's run-cache).

**Queue.** Each missing run is queued as ``dvc exp run --queue -n <name> -S ...``; a stale
experiment of HEAD holding the name (made by other code or params) is removed first (its stage
outputs stay in DVC's cache and run-cache). Then ``-j`` workers start (``dvc queue start -j``)
and the queue is followed until every run of the study has left it: each stage as it starts or
is restored from the run-cache, train's time estimate, each run's end. Interrupted (Ctrl-C, or
SIGTERM: exit status 143), the workers go on; ``study run`` again follows the runs still queued or running instead of
queueing them twice.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ddpm.errors import InputError
from pipeline import yamlio
from pipeline.errors import ExternalError
from pipeline.experiments import dvc_api
from pipeline.launch import SHARES
from pipeline.progress import format_seconds
from pipeline.stages._cli import stopped

RAN = re.compile(r"Running stage '([^']+)'")
CACHED = re.compile(r"Stage '([^']+)' is cached - skipping run")
UNCHANGED = re.compile(r"Stage '([^']+)' didn't change, skipping")
ESTIMATE = re.compile(r"^train: .*estimated total.*$")


def exp_show() -> list:
    """``dvc exp show --json`` for HEAD and every commit with experiments."""
    return dvc_api.exp_show(revs=["HEAD", *dvc_api.baselines()])


def current_check():
    """``current(rev)`` for ``study.match``: no stage of the experiment or commit ``rev`` would run again
    with today's code and dvc.yaml."""
    now = dvc_api.source_hashes()
    defined = yamlio.load(Path("dvc.yaml").read_text())["stages"]
    memo: dict[str, bool] = {}

    def current(rev: str) -> bool:
        if rev not in memo:
            memo[rev] = not dvc_api.stale_stages(rev, now, defined)
        return memo[rev]

    return current


def _dvc(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    except OSError as e:
        raise ExternalError(f"cannot run dvc: {e}") from None


def queue(run) -> None:
    """``dvc exp run --queue -n <name> -S ...`` of one run, after removing a stale experiment of HEAD
    with its name (``study.match`` found none with its params and code)."""
    if dvc_api.experiment_of_head(run.name):
        print(f"  {run.name}: replacing the experiment of that name, made by other params or code", flush=True)
        r = _dvc("exp", "remove", run.name)
        if r.returncode:
            raise ExternalError(f"experiment {run.name}: dvc exp remove failed: "
                                f"{dvc_api.last_line(r.stdout + r.stderr)}")
    args = ["exp", "run", "--queue", "-n", run.name, *[a for o in run.overrides for a in ("-S", o)]]
    r = _dvc(*args)
    if r.returncode:
        raise ExternalError(f"experiment {run.name}: dvc {' '.join(args[:5])} ... failed: "
                            f"{dvc_api.last_line(r.stdout + r.stderr)}")


class Follower:
    """Follows the queue entries of a study's runs: their states and the stage lines of their logs."""

    def __init__(self, entries: dict[str, str], echo=print, clock=time.monotonic):
        self.entries = entries  # run name → stash rev
        self.echo, self.clock, self.start = echo, clock, clock()
        self.state = dict.fromkeys(entries, "queued")
        self.offset = dict.fromkeys(entries, 0)
        self.ran: dict[str, list[str]] = {n: [] for n in entries}
        self.cached: dict[str, list[str]] = {n: [] for n in entries}  # restored from DVC's run-cache
        self.unchanged: dict[str, list[str]] = {n: [] for n in entries}  # up to date in the baseline commit
        self.began: dict[str, float] = {}
        self.took: dict[str, float] = {}
        self.errors: dict[str, list[str]] = {}  # its error lines: the stage's own (error: ...), DVC's (ERROR: ...)

    def error(self, name: str) -> str:
        """The first of the stage's own error lines, else DVC's last."""
        lines = self.errors.get(name, [])
        own = [line for line in lines if line.startswith("error")]
        return (own or lines or ["no error line in its log"])[0 if own else -1]

    def say(self, text: str) -> None:
        self.echo(f"[{format_seconds(self.clock() - self.start):>8}] {text}")

    def lines(self, name: str, path: str | None) -> None:
        if not path or not Path(path).is_file():
            return
        with open(path, "rb") as f:
            f.seek(self.offset[name])
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset[name] += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            line = line.strip()
            if m := RAN.search(line):
                self.ran[name].append(m[1])
                self.say(f"{name}: running stage {m[1]}")
            elif m := CACHED.search(line):
                self.cached[name].append(m[1])
                self.say(f"{name}: stage {m[1]} restored from the run-cache")
            elif m := UNCHANGED.search(line):
                self.unchanged[name].append(m[1])
                self.say(f"{name}: stage {m[1]} unchanged from the baseline commit")
            elif ESTIMATE.match(line):
                self.say(f"{name}: {line}")
            elif dvc_api.ERROR.match(line):
                self.errors.setdefault(name, []).append(line)

    def update(self, states: dict[str, str], logs: dict[str, str | None]) -> None:
        """``states``: stash rev → queued | running | success | failed (absent: it left the queue)."""
        for name, rev in self.entries.items():
            if self.state[name] in ("success", "failed"):
                continue
            self.lines(name, logs.get(rev))
            new = states.get(rev, "failed")
            if new == self.state[name]:
                continue
            self.state[name] = new
            if new == "running":
                self.began[name] = self.clock()
                self.say(f"{name}: started")
            elif new in ("success", "failed"):
                self.took[name] = self.clock() - self.began.get(name, self.start)
                done = sum(s in ("success", "failed") for s in self.state.values())
                if new == "success":
                    self.say(f"{name}: done in {format_seconds(self.took[name])} ({self.stage_counts(name)}) "
                             f"[{done}/{len(self.entries)}]")
                else:
                    self.say(f"{name}: FAILED ({self.error(name)}) [{done}/{len(self.entries)}]")

    def stage_counts(self, name: str) -> str:
        ran = [s for s in self.ran[name] if s not in ("check", "log")]  # check and log run every time
        return (f"{len(ran)} stages ran, {len(self.cached[name])} restored from the run-cache"
                + (f", {len(self.unchanged[name])} unchanged" if self.unchanged[name] else ""))

    def finished(self) -> bool:
        return all(s in ("success", "failed") for s in self.state.values())


def run(study, todo: list, adopted: list, jobs: int, poll: float, tracking_uri: str | None = None,
        experiment: str = "ddpm") -> None:
    """Queue ``todo``, start ``jobs`` workers and follow the queue until ``todo`` and ``adopted`` (runs
    already queued or running) are done; raises naming each run that failed."""
    from pipeline.experiments.study import plural
    from pipeline.tracking.study import ensure_database

    if jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {jobs}")
    # DVC's workers start `dvc`, and the stages `python`, from PATH: this interpreter's environment, as `make` does
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    ensure_database(tracking_uri, experiment)  # once, before parallel stages would create it at once
    if jobs > 1:  # each worker's experiment on its own share of the GPUs (pipeline.launch); workers inherit it
        os.environ.setdefault(SHARES, str(jobs))
    for i, r in enumerate(todo, 1):
        queue(r)
        own = study.experiments[r.experiment]
        print(f"  queued {r.name} ({i}/{len(todo)}): {'-S ' + ' -S '.join(own) if own else 'the base'}, seed {r.seed}",
              flush=True)
    names = [r.name for r in todo + adopted]
    entries = {n: rev for n, rev in dvc_api.queued().items() if n in names}
    missing = [n for n in names if n not in entries]
    if missing:
        raise ExternalError(f"queued experiments {', '.join(missing)} are not in DVC's queue (dvc queue status)")
    follower = Follower({n: entries[n] for n in names}, echo=lambda s: print(s, flush=True))
    idle = restarts = 0
    try:
        dvc_api.start_workers(jobs)
        print(f"study {study.name}: {plural(len(names), 'run')} in DVC's queue, {jobs} worker{'s' * (jobs > 1)} "
              "(dvc queue status; dvc queue logs NAME)", flush=True)
        while not follower.finished():
            time.sleep(poll)
            states, logs = dvc_api.queue_states()
            follower.update(states, logs)
            waiting = any(follower.state[n] == "queued" for n in names)
            running = "running" in states.values()
            idle = idle + 1 if waiting and not running else 0
            restarts = 0 if running else restarts
            if idle >= 3:  # workers stop when idle: start them again for what waits
                if restarts >= 5:
                    raise ExternalError("DVC's queue workers do not start: runs wait in the queue and none "
                                        "runs (dvc queue status; the worker logs: .dvc/tmp/exps/celery/*.out)")
                dvc_api.start_workers(jobs)
                idle, restarts = 0, restarts + 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (pipeline.stages._cli.Terminated): exit status 130 or 143
        left = [n for n in names if follower.state[n] in ("queued", "running")]
        print(f"\nstudy run: stopped following; {len(left)} runs go on in DVC's queue (dvc queue status, "
              "dvc queue kill NAME); `study run` again follows them", flush=True)
        raise SystemExit(stopped(e)[1]) from None
    failed = [n for n in names if follower.state[n] == "failed"]
    total = follower.clock() - follower.start
    whole = [n for n in names if follower.state[n] == "success" and not [s for s in follower.ran[n]
                                                                         if s not in ("check", "log")]]
    some = [n for n in names if follower.cached[n]]
    print(f"study {study.name}: {len(names) - len(failed)} of {plural(len(names), 'run')} done in {format_seconds(total)}; "
          f"the run-cache restored stages of {len(some)} of them and every stage of {len(whole)}", flush=True)
    if failed:
        raise ExternalError(f"{len(failed)} of {len(names)} experiments failed: "
                            + "; ".join(f"{n} ({follower.error(n)})" for n in failed)
                            + " (their logs: dvc queue logs NAME)")
