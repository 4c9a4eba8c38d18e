"""Command `exp-show` (not a DVC stage): the experiments in one screen, as plain text that reads the same in a
terminal, a pipe and a CI log.

``dvc exp show`` draws every metric, param and dependency as a column (about 240 for the CPU preset)
and fits them into the terminal's width: in a pipe or with ``--no-pager`` every cell is then ``…``,
and in its pager the params sit far to the right. This reads the same experiments (``dvc exp show
--json``, through ``dvc_api.exp_show``; a saved copy with ``--exp-json``) and prints one line per run,
the best first: its name (``(workspace)`` when the workspace holds its results, as ``compare``
folds it), when it was made, the best FID and its cell, the real-data floor, bits/dim, the EMA
weights' held-out denoising MSE, and the params that differ between the runs shown. A ``*`` marks
the best FID. ``--cells`` adds the FID of every cell. FIDs measured with different rulers are not
comparable: then a line says so and a column names each run's ruler, and the ``*`` goes to the best
of the most common ruler. Experiments queued, running or failed are named in a last line, not shown
(a running one's results are the workspace's as it writes them).
"""

import json
from pathlib import Path

import typer

from ddpm.errors import InputError
from pipeline.experiments import dvc_api
from pipeline.experiments.compare import experiment_rows, rulers, runs
from pipeline.stages._cli import one_line, stage_app

NOT_COMPARED = {"data.root"}  # where this machine keeps the data: differs between machines, changes no result


def settled(shown: list) -> tuple[list, list[tuple[str, str]]]:
    """``dvc exp show --json`` without the experiments that are queued, running or failed (their results are
    missing, or partial: a running experiment's are the workspace's as they are written), and without the workspace
    while an experiment runs there; and those left out, (name, state)."""
    out, left = [], []
    for commit in shown:
        experiments = []
        for exp in commit.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            if state in (None, "success"):
                experiments.append(exp)
            else:
                left.append((exp.get("name") or "?", state))
        out.append({**commit, "experiments": experiments or None} if commit.get("experiments") else commit)
    busy = any((exp.get("executor") or {}).get("name") == "workspace" and (exp.get("executor") or {}).get("state")
               == "running" for commit in shown for exp in commit.get("experiments") or [])
    return [c for c in out if not (busy and c.get("rev") == "workspace")], left


def changed(rows: list[dict]) -> list[str]:
    """The params (flat keys) whose values differ between the rows, in params.yaml's order."""
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    return [k for k in keys if k not in NOT_COMPARED
            and len({json.dumps(r["params"].get(k), sort_keys=True) for r in rows}) > 1]


def _number(value, spec: str) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else spec.format(value)


def _value(value) -> str:
    """A param's value as params.yaml spells it (``null``, ``true``, ``[10,20]``)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def table(rows: list[dict], cells: bool = False) -> list[str]:
    """The lines of the view: a header line, then one line per row, the best FID first."""
    found = rulers(rows)
    mixed = len(found) > 1
    best = min((r for r in rows if (r.get("ruler") or "?") == found[0]), key=lambda r: r["best_fid"])
    keys = changed(rows)
    cell_names = sorted({c for r in rows for c, v in r["cells"].items() if "fid" in v},
                        key=lambda c: (c.split("-")[0], int(c.split("-")[1]) if c.split("-")[1].isdigit() else 0, c))
    header = ["", "experiment", "created", "best FID", "best cell", "floor", "bits/dim", "denoise MSE"]
    header += [f"FID {c}" for c in cell_names] if cells else []
    header += ["ruler"] if mixed else []
    header += ["changed params"]
    body = []
    for r in sorted(rows, key=lambda r: ((r.get("ruler") or "?") != found[0], r["best_fid"])):
        name = r["experiment"] + (" (workspace)" if r.get("workspace") and r["rev"] != "workspace" else "")
        line = ["*" if r is best else "", name, (r.get("created") or "-").replace("T", " ")[:16],
                _number(r["best_fid"], "{:.4g}"), r["best_cell"], _number(r.get("floor_fid"), "{:.4g}"),
                _number(r.get("bits_per_dim"), "{:.3f}"), _number(r.get("denoise_ema_mse"), "{:.4g}")]
        line += [_number(r["cells"].get(c, {}).get("fid"), "{:.4g}") for c in cell_names] if cells else []
        line += [r.get("ruler") or "?"] if mixed else []
        line += [", ".join(f"{k}={_value(r['params'].get(k))}" for k in keys) or "-"]
        body.append(line)
    numeric = {i for i, h in enumerate(header) if h in ("best FID", "floor", "bits/dim", "denoise MSE")
               or h.startswith("FID ")}
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(line, widths)) if w).rstrip()

    notes = []
    if mixed:
        notes.append(f"warning: these FIDs were measured with {len(found)} rulers ({', '.join(found)}); FIDs of "
                     f"different rulers are not comparable: * marks the best of ruler {found[0]}")
    return notes + [fmt(header)] + [fmt(line) for line in body]


app = stage_app()


@app.command("exp-show")
def exp_show(exp_json: Path = typer.Option(None, "--exp-json", help="a saved `dvc exp show --json` (default: read "
                                                                     "the repository's experiments)"),
             commits: str = typer.Option("head", help="head: the experiments of HEAD; all: of every commit"),
             cells: bool = typer.Option(False, "--cells", help="also the FID of every cell (sampler-steps)")):
    """The experiments in one screen, best FID first: the best cell, the floor, bits/dim, the denoising MSE and
    the params that differ. Plain text for a terminal, a pipe or a CI log (dvc exp show --json, read). Not a DVC
    stage."""
    one_line(main)(exp_json, commits, cells)


def main(exp_json: Path | None, commits: str = "head", cells: bool = False) -> None:
    if commits not in dvc_api.COMMITS:
        raise InputError(f"commits must be one of {', '.join(dvc_api.COMMITS)}, got {commits!r}")
    if exp_json is not None:
        if not exp_json.is_file():
            raise FileNotFoundError(f"{exp_json} does not exist")
        shown = json.loads(exp_json.read_text())
    else:
        shown = dvc_api.exp_show(commits)
    done, left = settled(shown)
    rows = experiment_rows(done, [])
    if not rows:
        print("No experiments with results (metrics/fid.json) yet: `make repro`, or `python -m pipeline exp-run -S "
              "key=value`.")
    else:
        print("\n".join(table(rows, cells)))
    if left:
        print(f"(not shown: {', '.join(f'{name} ({state})' for name, state in left)}; `dvc queue status`)")
    if (unfinished := len(runs(done)) - len(rows)) > 0:
        print(f"({unfinished} more without results: `dvc exp show`)")
