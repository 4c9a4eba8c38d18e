"""``python -m pipeline exp-run [ARGS]``: ``dvc exp run ARGS``, once the params it would run with
pass the checks of the `check` stage. Not a DVC stage.

Why: a bad value normally fails in the `check` stage, before DVC deletes the outputs of the
stage it would run next. But ``dvc exp run`` touches outputs before any stage runs: its executor
first checks out the pipeline as the new params expand it (DVC 3.67,
``dvc/repo/experiments/executor/base.py``: ``dvc_checkout(..., force=True, allow_missing=True)``),
and a checkout without targets begins by deleting every output DVC once linked that is no longer
the output of any stage (``dvc/repo/checkout.py``: ``_remove_unused_links``). So a ``-S`` that
changes the sample matrix (``sample.samplers``, ``sample.steps``, ``sample.guidance``: they
expand the ``sample``, ``fid`` … stages) deletes the cells that leave it, even when the new value
is a typo that `check` then refuses (``-S 'sample.samplers=[ddpm,nope]'`` deletes the ``ddim``
cells; ``-S 'sample.steps=[200]'`` beyond ``timesteps``, every cell). Plain ``dvc repro`` does not
check out, and deletes nothing of the kind.

This command applies the ``-S`` overrides as DVC does (DVC's own argument parser and its
``apply_overrides``, on a copy of params.yaml; each combination of a ``--queue`` sweep), runs the
`check` stage's checks on the result (``pipeline.stages.check.verify``: params, data files, writable
outputs), and only then runs ``dvc exp run`` with the same arguments, returning its exit status
(DVC's CLI through ``dvc_api.run_cli``: in a workspace without results yet, DVC's ~80 warnings
"No file hash info found … It won't be created", one per output, are one line).
A refused value is one ``error:`` line, and nothing in the workspace has changed. A SIGTERM
is passed on to ``dvc exp run`` (which then has ``STOP_GRACE`` seconds to stop).

The experiment is named for what it changes: a single experiment with ``-S`` overrides and no
``-n``/``--name`` gets ``-n <overrides>`` (``ema.sigma_rel=0.05``, ``schedule=cosine,seed=1``;
``-2``, ``-3`` … when HEAD already has an experiment of that name), because ``dvc exp show``
puts its param columns after all the metrics, out of sight in a terminal: the name, in its
first column, says which params changed. Sweeps, ``-n``, names that git refuses or longer than
MAX_NAME characters are left to DVC.

What DVC can still delete (each file stays in DVC's cache; ``dvc checkout`` restores it once
params.yaml names its cell again): a *valid* change of the matrix under ``dvc exp run``
removes the workspace copies of the cells that leave it, and so does ``dvc exp run`` or
``dvc checkout`` run directly after params.yaml was edited by hand.
"""

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import typer
import yaml

from pipeline import yamlio
from pipeline.errors import ExternalError
from pipeline.experiments import dvc_api
from pipeline.params.base import ParamsError
from pipeline.params.schema import parse_params
from pipeline.stages._cli import STOP_GRACE, Terminated, one_line, stage_app
from pipeline.stages.check import verify

PARAMS = "params.yaml"  # DVC's default params file, the pipeline's
MAX_NAME = 60  # characters of an experiment name made from its overrides
NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9._=,+-]")  # dropped from a name made from overrides ([, ], quotes, …)


def overrides(args: list[str]) -> list[list[str]] | None:
    """The ``-S`` overrides of params.yaml in the ``dvc exp run`` arguments ``args``: one list per
    experiment they make (several for a ``--queue`` sweep such as ``-S 'seed=0,1,2'``). None when
    DVC will not run an experiment from them (``--help``, ``--run-all``, arguments DVC refuses):
    then DVC itself speaks."""
    try:
        return dvc_api.run_overrides(args, PARAMS)
    except ValueError as e:
        raise ParamsError(str(e)) from None


def apply(params: Path, override: list[str]) -> dict:
    """The params that ``dvc exp run -S <override>`` would write into ``params`` (read from a copy)."""
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / PARAMS
        shutil.copyfile(params, copy)
        if override:
            try:
                dvc_api.apply_overrides(copy, override)
            except ValueError as e:
                raise ParamsError(f"-S {' -S '.join(override)}: {e}") from None
        try:
            return yamlio.load(copy.read_text())
        except yaml.YAMLError as e:
            raise ParamsError(f"{params} is not valid YAML: {e}") from None


def experiment_name(args: list[str], runs: list[list[str]] | None, taken: set[str]) -> str | None:
    """The name for a single experiment from its ``-S`` overrides (``schedule=cosine,seed=1``), made unique
    among ``taken`` with ``-2``, ``-3`` …; None when DVC names it (a sweep, no overrides, ``-n`` given, a
    name git refuses as a ref or longer than MAX_NAME)."""
    named = any(a in ("-n", "--name") or a.startswith("--name=") for a in args)
    if named or runs is None or len(runs) != 1 or not runs[0]:
        return None
    name = NOT_IN_NAMES.sub("", ",".join(runs[0]))
    if not name or len(name) > MAX_NAME or subprocess.run(
            ["git", "check-ref-format", f"refs/exps/x/{name}"], capture_output=True).returncode != 0:
        return None
    unique, k = name, 2
    while unique in taken:
        unique, k = f"{name}-{k}", k + 1
    return unique


app = stage_app()


@app.command("exp-run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exp_run(ctx: typer.Context):
    """`dvc exp run ARGS` (pass DVC's arguments: -S key=value, --queue, targets, ...), once params.yaml with
    the -S overrides applied passes the check stage's checks. `dvc exp run` deletes the outputs of sample
    matrix cells that a -S removes before any stage runs, so a typo there (an unknown sampler in sample.samplers,
    a step count beyond timesteps) would cost results; here it fails first, with one line. Not a DVC stage."""
    sys.exit(one_line(main)(list(ctx.args)))


def main(args: list[str], dvc_yaml: Path = Path("dvc.yaml")) -> int:
    runs = overrides(args)
    if runs is not None:
        if not Path(PARAMS).is_file():
            raise ParamsError(f"params file {PARAMS} does not exist")
        for override in runs:
            source = PARAMS + (f" with -S {' -S '.join(override)}" if override else "")
            verify(parse_params(apply(Path(PARAMS), override), source), dvc_yaml)
        if name := experiment_name(args, runs, dvc_api.experiment_names() if len(runs) == 1 and runs[0] else set()):
            args = ["-n", name, *args]
        print(f"exp-run: {len(runs)} set{'s' if len(runs) > 1 else ''} of params passed the check stage's checks; "
              f"running dvc exp run {' '.join(args)}", flush=True)
    try:  # DVC's CLI, its warnings for outputs without results yet (a fresh clone) folded into one line
        dvc = subprocess.Popen([sys.executable, "-m", "pipeline.experiments.dvc_api", "exp", "run", *args])
    except OSError as e:
        raise ExternalError(f"cannot run dvc: {e}") from None
    try:
        return dvc.wait()
    except KeyboardInterrupt as e:  # pass a SIGTERM on to DVC (Ctrl-C reached it from the terminal) and let it stop
        if isinstance(e, Terminated):
            dvc.terminate()
        try:
            dvc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            dvc.kill()
        raise
