"""Every call into DVC's Python API (3.67) that its CLI has no machine-readable answer for, in one
place: reading experiments, applying ``-S`` overrides as ``dvc exp run`` does, the queue, and which
stages of an experiment would run again. Nothing else in the project imports ``dvc``.

The experiments are read in-process through ``Repo.experiments.show``, on which both ``dvc exp
show`` and ``dvc.api.exp_show`` are built, serialised as the CLI does. (``dvc.api.exp_show`` itself
flattens this into one table row per experiment whose columns drop the file wherever a name is
unique and whose values are display strings: fid_floor.json's ``fid`` becomes a bare ``fid`` beside
fid.json's ``fid.ddim.50``, lists become ``"[1, 2]"``, integers floats; the nesting by file the
commands read is gone.)

**Which stages would run again** (``stale_stages``), for an experiment of another commit or params:
DVC's own test, per stage of its ``dvc.lock``. A stage runs again when its definition in dvc.yaml
changed (command template, params, outputs: comments aside), when the code it depends on (its
dependencies under the packages) is another set of files, or when one of its source dependencies
(those no stage writes) hashes otherwise now; and a stage that did not exist then runs. Stages that
always run (``always_changed``) never count. What the stages before it wrote is left to them: an
output is stale only when the stage that writes it runs again.

**DVC's command line** (``run_cli``, ``python -m pipeline.experiments.dvc_api ARGS`` = ``dvc ARGS``): as
DVC's, but for the warning its checkout gives for each output that ``dvc.lock`` has no hash for, which
``dvc exp run`` in a workspace without results (a fresh clone) gives for every output of the pipeline
before any stage runs (about 80 lines of ``No file hash info found for '…'. It won't be created.``):
one line says what they mean instead.
"""

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

from pipeline import yamlio
from pipeline.errors import ExternalError

PACKAGES = ("ddpm", "pipeline")  # the code a stage imports (pipeline.experiments.deps)


@contextmanager
def repository(root: Path | str | None = None):
    from dvc.repo import Repo

    with Repo(str(root) if root is not None else os.getcwd()) as repo:
        yield repo


# ----------------------------------------------------------------------------- experiments
COMMITS = {"head": False, "all": True}  # experiments of HEAD, or of every commit (all_commits)


def exp_show(commits: str = "head", cwd: Path | None = None, revs: list[str] | None = None) -> list:
    """The repository's experiments as ``dvc exp show --json`` gives them: the workspace, HEAD and its
    experiments for ``commits="head"``, every commit's for ``"all"``, those of the commits ``revs``
    when given (``dvc exp show --rev ...``)."""
    from datetime import date, datetime

    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    def default(item):
        return item.isoformat() if isinstance(item, (date, datetime)) else str(item)

    try:
        with Repo.open(str(cwd) if cwd is not None else None) as repo:
            exps = repo.experiments.show(all_commits=COMMITS[commits] and not revs, revs=revs or None)
            return json.loads(json.dumps([exp.dumpd() for exp in exps], default=default))
    except DvcException as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExternalError(f"reading the DVC experiments failed: {first}") from None


def baselines() -> list[str]:
    """The commits that have experiments (``refs/exps``)."""
    from dvc.repo.experiments.utils import exp_refs

    with repository() as repo:
        return sorted({ref.baseline_sha for ref in exp_refs(repo.scm)})


def experiment_names() -> set[str]:
    """The names of HEAD's experiments (DVC refuses a second experiment of one name on one commit)."""
    with repository(".") as repo:
        return {name for exps in repo.experiments.ls().values() for name, _ in exps if name}


def experiment_of_head(name: str) -> str | None:
    """The ref of HEAD's experiment ``name``, or None."""
    from dvc.repo.experiments.refs import ExpRefInfo

    with repository() as repo:
        return repo.scm.get_ref(str(ExpRefInfo(repo.scm.get_rev(), name)))


# ----------------------------------------------------------------------------- -S overrides, as dvc exp run applies them
def run_overrides(args: list[str], params_file: str = "params.yaml") -> list[list[str]] | None:
    """The ``-S`` overrides of ``params_file`` in the ``dvc exp run`` arguments ``args``: one list per
    experiment they make (several for a ``--queue`` sweep such as ``-S 'seed=0,1,2'``). None when DVC
    will not run an experiment from them (``--help``, ``--run-all``, arguments DVC refuses): then DVC
    itself speaks. ``ValueError`` carries hydra's message for an override it cannot parse."""
    from dvc.cli import DvcParserError, parse_args
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides

    if {"-h", "--help"} & set(args):
        return None
    logging.disable(logging.CRITICAL)  # DVC logs argument errors; it says them again when it runs
    try:
        with redirect_stderr(StringIO()), redirect_stdout(StringIO()):
            ns = parse_args(["exp", "run", *args])  # DVC says what is wrong when it runs
    except (DvcParserError, SystemExit):
        return None
    finally:
        logging.disable(logging.NOTSET)
    if getattr(ns, "run_all", False):
        return None
    by_path = to_path_overrides(ns.set_param or [])
    try:
        sweep = any(o.is_sweep_override() for o in to_hydra_overrides(by_path.get(params_file, [])))
        if sweep and not ns.queue:
            return None  # DVC refuses a sweep without --queue
        return [s.get(params_file, []) for s in (get_hydra_sweeps(by_path) if sweep else [by_path])]
    except Exception as e:  # noqa: BLE001 - hydra's parse errors (DVC stops on them too, before any checkout)
        text = str(e).strip()
        raise ValueError(f"invalid -S override in {' '.join(by_path.get(params_file, []))!r}: "
                         f"{text.splitlines()[0] if text else type(e).__name__}") from None


def apply_overrides(path: Path, overrides: list[str]) -> None:
    """Apply ``-S`` overrides to the params file at ``path`` as ``dvc exp run`` does; ``ValueError`` says
    what DVC refused."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides as apply

    try:
        apply(path, overrides)
    except DvcException as e:
        cause = e.__cause__
        raise ValueError(f"{e}" + (f" ({str(cause).strip().splitlines()[0]})" if cause and str(cause).strip()
                                   else "")) from None


ERROR = re.compile(r"^(ERROR|error):? .*$")  # DVC's error line, or a stage's own


def last_line(text: str) -> str:
    """What DVC's output says went wrong: its last error line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR.match(line)]
    return (errors or lines or ["(no output)"])[-1]


# ----------------------------------------------------------------------------- the queue
def queued() -> dict[str, str]:
    """Name → stash rev of the named experiments queued or running in DVC's queue."""
    with repository() as repo:
        q = repo.experiments.celery_queue
        return {e.name: e.stash_rev for e in [*q.iter_active(), *q.iter_queued()] if e.name}


def queue_states() -> tuple[dict[str, str], dict[str, str | None]]:
    """(stash rev → queued | running | success | failed, stash rev → the file its log is in)."""
    with repository() as repo:
        q = repo.experiments.celery_queue
        states = {e.stash_rev: "queued" for e in q.iter_queued()}
        states.update({e.stash_rev: "running" for e in q.iter_active()})
        states.update({e.stash_rev: "success" for e, _ in q.iter_success()})
        states.update({e.stash_rev: "failed" for e, _ in q.iter_failed()})
        logs = {}
        for rev in states:
            info = q.proc.get(rev)
            logs[rev] = info.stdout if info is not None else None
    return states, logs


def start_workers(jobs: int) -> None:
    """Start ``jobs`` queue workers: `dvc queue start -j`, in a process of its own whose standard streams are
    /dev/null and a file. DVC forks a daemon per worker that lives as long as the worker (until some seconds
    after the queue empties), and a fork keeps every file its parent had open: from this process, the daemon
    would hold its stdout, so that `study run | tee`, or a test capturing its output, would end only when the
    idle worker quits."""
    with tempfile.TemporaryFile("w+") as out:
        r = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)],
                           stdin=subprocess.DEVNULL, stdout=out, stderr=out, text=True)
        if r.returncode != 0:
            out.seek(0)
            raise ExternalError(f"dvc queue start -j {jobs} failed: {last_line(out.read())}")


# ----------------------------------------------------------------------------- which stages would run again
def _overlaps(path: str, others: list[str]) -> bool:
    return any(path == o or path.startswith(o.rstrip("/") + "/") or o.startswith(path.rstrip("/") + "/")
               for o in others)


def source_hashes() -> dict[str, str]:
    """Path → DVC's hash now, of every dependency of the pipeline that no stage writes."""
    from dvc.dependency.param import ParamsDependency

    with repository() as repo:
        stages = list(repo.index.stages)
        outs = [str(o.def_path) for s in stages for o in s.outs]
        hashes: dict[str, str] = {}
        for stage in stages:
            for dep in stage.deps:
                path = str(dep.def_path)
                if isinstance(dep, ParamsDependency) or path in hashes or _overlaps(path, outs):
                    continue
                hashes[path] = dep.get_hash().value
    return hashes


def _git_yaml(rev: str, path: str) -> dict | None:
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return (yamlio.load(shown.stdout) or {}) if shown.returncode == 0 else None


def _definition(spec: dict) -> dict:
    """A stage's definition without its code dependencies (compared by their hashes instead)."""
    deps = [d for d in spec.get("deps", []) if not (isinstance(d, str) and d.split("/")[0] in PACKAGES)]
    return {**spec, "deps": deps}


def _code(spec: dict) -> set[str]:
    return {d for d in spec.get("deps", []) if isinstance(d, str) and d.split("/")[0] in PACKAGES}


def stale_stages(rev: str, now: dict[str, str], defined: dict | None = None) -> list[str]:
    """The stages of the experiment or commit ``rev`` that ``dvc repro`` would run again with today's
    code and dvc.yaml (see the module docstring): ``now`` is ``source_hashes()``, ``defined`` today's
    stages (dvc.yaml's). Empty when nothing would run again."""
    lock, then = _git_yaml(rev, "dvc.lock"), _git_yaml(rev, "dvc.yaml")
    defined = defined if defined is not None else yamlio.load(Path("dvc.yaml").read_text())["stages"]
    if not lock or not then:
        return ["(no dvc.lock)"]
    locked, before = lock.get("stages") or {}, then.get("stages") or {}
    stale = [name for name in defined if name not in before and not defined[name].get("always_changed")]
    for name, entry in locked.items():
        base = name.split("@")[0]
        spec = defined.get(base)
        if spec is not None and spec.get("always_changed"):
            continue
        deps = {d["path"]: d.get("md5") or d.get("hash") for d in entry.get("deps") or []}
        code_then = {p for p in deps if p.split("/")[0] in PACKAGES}
        if spec is None or base not in before or _definition(spec) != _definition(before[base]) \
                or code_then != _code(spec) or any(p in now and now[p] != h for p, h in deps.items()):
            stale.append(name)
    return stale


# ----------------------------------------------------------------------------- DVC's command line
NO_HASH = "No file hash info found"  # dvc_data's checkout, for an output dvc.lock records no hash of
CHECKOUT_LOGGERS = ("dvc_data.index.checkout", "dvc_data.hashfile.checkout")
NO_HASH_NOTE = ("note: this workspace has no recorded results of some outputs yet (a fresh clone, or new stages), "
                "so DVC's checkout before the run warns 'No file hash info found … It won't be created' for each of "
                "them; those warnings are not shown: nothing is wrong, the stages make the outputs")


class NoHashOnce(logging.Filter):
    """Drops DVC's no-hash warnings, saying NO_HASH_NOTE once (to ``say``) in their place."""

    def __init__(self, say):
        super().__init__()
        self.say, self.dropped = say, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if NO_HASH not in record.getMessage():
            return True
        if not self.dropped:
            self.say(NO_HASH_NOTE)
        self.dropped += 1
        return False


def run_cli(args: list[str]) -> int:
    """``dvc ARGS`` in this process (DVC's own ``main``), its no-hash warnings folded into one line
    (``NoHashOnce``); DVC's exit status."""
    from dvc.cli import main

    quiet = NoHashOnce(lambda line: print(line, file=sys.stderr, flush=True))
    for name in CHECKOUT_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    return main(args)


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
