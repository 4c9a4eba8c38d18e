"""Command `compare` (not a DVC stage: it reads across experiments): the ablation table.

Reads the DVC experiments (in-process, as ``dvc exp show --json`` has them; or a saved copy
of that output) and
writes one row per experiment (params that differ, best FID and its cell, bits/dim when
the `nll` stage wrote ``metrics/nll.json``, the extractor's test accuracy) and a pivot
table ``rows × columns`` of params (default schedule × prediction) holding the best FID
over the experiments with those values, and their bits/dim where present.

Experiments that differ only in the training ``seed`` are one configuration run several
times: for every such group of two or more, a third table gives the mean ± sample
standard deviation over the seeds of every cell's FID, of the best cell's FID and of
bits/dim, so that two ablations can be told apart from seed noise.

``--sigma-rel-figure`` adds FID against the EMA length σ_rel over the experiments of a
σ_rel sweep (``pipeline.experiments.ema_sweep``: a table, and a figure with one line per sampler).

Every row names the ruler its FIDs were measured with (``metrics/fid.json``'s ``ruler``: the
extractor, its weights and the reference statistics, ``ddpm.ruler``). FIDs of different rulers are
not comparable: when the experiments hold more than one, the table says so above it, marks each
row with its ruler, and the pivot table compares only the experiments of the most common one.

Every run is one row, also the one in the workspace. ``dvc exp show`` always lists the
workspace as a row of its own, and after ``dvc exp run`` (which leaves the experiment's
results in the workspace), ``dvc exp apply`` or a committed ``dvc repro`` that row repeats
an experiment's or a commit's params and metrics: the same run twice, which would also
count twice in the tables. A DVC user names a run by its experiment name or commit (what
``dvc exp apply``, ``exp branch`` and ``exp remove`` take), so a workspace whose params and
metrics equal those of an experiment or commit is that run's row, marked "(workspace)"
(``"workspace": true`` in the JSON), not a row of its own. A workspace that differs from
all of them (params changed and not yet run, a run not yet committed) stays a
``workspace`` row.
"""

import json
import statistics
from pathlib import Path

import typer

from ddpm.errors import InputError
from pipeline.outputs import write_atomic
from pipeline.params.base import flatten
from pipeline.experiments import dvc_api
from pipeline.stages._cli import one_line, stage_app

PARAMS_FILE = "params.yaml"
# (file, keys): the first key an experiment has; the second is where experiments recorded before the
# metrics were named by block (nll.bits_per_dim, classifier.test_accuracy) hold it
BPD = ("metrics/nll.json", ("nll.bits_per_dim", "bits_per_dim"))
ACCURACY = ("metrics/classifier.json", ("classifier.test_accuracy", "test_accuracy"))
FLOOR = ("metrics/fid_floor.json", ("floor.fid",))
DENOISE = ("metrics/denoise.json", ("denoise.ema_mse",))


def _revisions(node, parent_name=None):
    """Every (name, rev, data) in dvc's exp-show JSON: commits, the workspace and their experiments."""
    if isinstance(node, list):
        for item in node:
            yield from _revisions(item, parent_name)
    elif isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "params" in data:
            yield node.get("name") or parent_name, node.get("rev", "?"), data
        for exp in node.get("experiments") or []:
            yield from _revisions(exp.get("revs") or [], exp.get("name"))


WORKSPACE = "workspace"  # the rev dvc exp show gives the working tree


def _run_key(data: dict) -> str:
    return json.dumps([data.get("params"), data.get("metrics")], sort_keys=True, default=str)


def runs(exp_show) -> list[tuple]:
    """Each distinct run once, as (name, rev, data, in_workspace): the workspace folded into the
    first commit or experiment with the same params and metrics (see the module docstring)."""
    revisions = list(_revisions(exp_show))
    committed: dict[str, int] = {}
    for i, (_, rev, data) in enumerate(revisions):
        if rev != WORKSPACE and data.get("metrics"):
            committed.setdefault(_run_key(data), i)
    folded = {i: committed.get(_run_key(data)) for i, (_, rev, data) in enumerate(revisions) if rev == WORKSPACE}
    in_workspace = {j for j in folded.values() if j is not None}
    return [(name, rev, data, i in in_workspace) for i, (name, rev, data) in enumerate(revisions)
            if folded.get(i) is None]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _metric(data: dict, file: str, key: str):
    return _get((data.get("metrics") or {}).get(file) or {}, f"data.{key}")


def _first(data: dict, where: tuple[str, tuple[str, ...]]):
    file, keys = where
    return next((v for key in keys if (v := _metric(data, file, key)) is not None), None)


def _cells(data: dict) -> dict:
    """{"ddim-20": {"fid": …}, "ddim-20-w1": {"fid": …}} from metrics/fid.json's ``fid`` table
    ({sampler: {steps or steps-guidance: FID}}; experiments recorded before it held only the FID also
    have precision, recall, … per cell, read the same way)."""
    fid = (((data.get("metrics") or {}).get("metrics/fid.json") or {}).get("data")) or {}
    cells: dict = {}
    for metric, table in fid.items():
        if metric in ("best", "floor", "guided") or not isinstance(table, dict):  # older files: floor, guided
            continue
        for sampler, by_steps in table.items():
            if not isinstance(by_steps, dict):
                continue
            for steps, value in by_steps.items():
                cells.setdefault(f"{sampler}-{steps}", {})[metric] = value
    return cells


def experiment_rows(exp_show: list, keys: list[str]) -> list[dict]:
    """One row per run that has FID metrics (with all its params and per-cell metrics); a
    workspace that repeats an experiment or commit is that row, with ``workspace`` true."""
    rows, seen = [], set()
    for name, rev, data, in_workspace in runs(exp_show):
        params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
        best = _metric(data, "metrics/fid.json", "best")
        if not isinstance(best, dict) or "fid" not in best:
            continue
        short = str(rev)[:7] if len(str(rev)) == 40 else str(rev)
        name = name or short
        label = name if name not in seen else f"{name}@{short}"
        seen.add(label)
        rows.append({"experiment": label, "rev": short, "workspace": in_workspace or rev == WORKSPACE,
                     **{k: _get(params, k) for k in keys},
                     "best_fid": best["fid"], "best_cell": f"{best.get('sampler')}-{best.get('steps')}",
                     "bits_per_dim": _first(data, BPD), "ruler": _metric(data, "metrics/fid.json", "ruler"),
                     "classifier_accuracy": _first(data, ACCURACY), "floor_fid": _first(data, FLOOR),
                     "denoise_ema_mse": _first(data, DENOISE), "created": data.get("timestamp"),
                     "params": flatten(params), "cells": _cells(data)})
    return rows


SEED_KEY = "seed"


def seed_groups(rows: list[dict], seed_key: str = SEED_KEY) -> list[tuple[str, list[dict]]]:
    """Groups of two or more rows whose params are equal but for ``seed_key``, each labelled by
    the params that vary between experiments (``key=value, …``; "baseline" when none do).
    ``rows`` hold each run once (``experiment_rows``)."""
    def config(r):
        return {k: v for k, v in r["params"].items() if k != seed_key}

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps(config(r), sort_keys=True, default=str), []).append(r)
    varying = sorted({k for r in rows for k in config(r) if len({json.dumps(config(o).get(k)) for o in rows}) > 1})
    out = []
    for members in groups.values():
        seeds = {r["params"].get(seed_key) for r in members}
        if len(seeds) < 2:
            continue
        c = config(members[0])
        label = ", ".join(f"{k}={c.get(k)}" for k in varying) or "baseline"
        out.append((label, members))
    return out


def mean_std(values: list) -> tuple[float, float] | None:
    """Mean and sample standard deviation (n - 1) of the values that are numbers; None if fewer than one."""
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(ms, spec="{:.2f}") -> str:
    return "–" if ms is None else f"{spec.format(ms[0])} ± {spec.format(ms[1])}"


def render_seeds(rows: list[dict]) -> str:
    """The mean ± std table over seeds (empty string when no configuration ran with two seeds)."""
    groups = seed_groups(rows)
    if not groups:
        return ""
    cells = sorted({c for _, members in groups for r in members for c in r["cells"]},
                   key=lambda c: (c.rsplit("-", 1)[0], int(c.rsplit("-", 1)[1]) if c.rsplit("-", 1)[1].isdigit() else 0))
    has_bpd = any(r["bits_per_dim"] is not None for _, m in groups for r in m)
    cols = ["configuration", "seeds", "best FID"] + [f"FID {c}" for c in cells] + (["bits/dim"] if has_bpd else [])
    lines = ["", "## Across seeds: mean ± std (sample std, n − 1)", "",
             "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for label, members in sorted(groups, key=lambda g: mean_std([r["best_fid"] for r in g[1]])[0]):
        seeds = sorted(str(r["params"].get(SEED_KEY)) for r in members)
        vals = [label, ",".join(seeds), _pm(mean_std([r["best_fid"] for r in members]))]
        vals += [_pm(mean_std([r["cells"].get(c, {}).get("fid") for r in members])) for c in cells]
        vals += [_pm(mean_std([r["bits_per_dim"] for r in members]), "{:.3f}")] if has_bpd else []
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def pivot(rows: list[dict], row_key: str, col_key: str) -> tuple[list, list, dict]:
    """{(row value, column value): (best FID, bits/dim of that experiment or None)}."""
    cells: dict = {}
    for r in rows:
        k = (r[row_key], r[col_key])
        if k not in cells or r["best_fid"] < cells[k][0]:
            cells[k] = (r["best_fid"], r["bits_per_dim"])
    row_vals = sorted({k[0] for k in cells}, key=str)
    col_vals = sorted({k[1] for k in cells}, key=str)
    return row_vals, col_vals, cells


def _fmt(v, spec="{:.3f}"):
    return "–" if v is None else spec.format(v) if isinstance(v, (int, float)) else str(v)


def rulers(rows: list[dict]) -> list[str]:
    """The rulers the rows' FIDs were measured with, the most common first (rows recorded before FIDs named
    their ruler have none: ``"?"``)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("ruler") or "?"] = counts.get(r.get("ruler") or "?", 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k == "?", k))


def render(rows: list[dict], row_key: str, col_key: str, extra: list[str]) -> str:
    if not rows:
        return "No experiments with FID metrics (metrics/fid.json) found.\n"
    has_bpd = any(r["bits_per_dim"] is not None for r in rows)
    keys = list(dict.fromkeys([row_key, col_key, *extra]))  # --param schedule with --rows schedule: one column
    found = rulers(rows)
    mixed = len(found) > 1
    cols = ["experiment", "rev", *keys, "best FID", "best cell"] + (["bits/dim"] if has_bpd else []) + ["extractor acc."]
    cols += ["ruler"] if mixed else []
    lines = ["## Experiments", ""]
    if mixed:
        lines += [f"**Warning: these FIDs were measured with {len(found)} different rulers** ({', '.join(found)}; "
                  "`?`: not recorded). FIDs of different rulers are not comparable: the pivot table below holds "
                  f"only the experiments measured with ruler {found[0]}. Pin a ruler (`fid.ruler`) to keep one.", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: r["best_fid"]):
        name = r["experiment"] + (" (workspace)" if r.get("workspace") and r["rev"] != WORKSPACE else "")
        vals = [name, r["rev"], *(_fmt(r[k], "{}") for k in keys), _fmt(r["best_fid"]), r["best_cell"]]
        vals += [_fmt(r["bits_per_dim"])] if has_bpd else []
        vals += [_fmt(r["classifier_accuracy"], "{:.4f}")]
        vals += [(r.get("ruler") or "?") + ("" if (r.get("ruler") or "?") == found[0] else " †")] if mixed else []
        lines.append("| " + " | ".join(vals) + " |")
    if mixed:
        rows = [r for r in rows if (r.get("ruler") or "?") == found[0]]
    row_vals, col_vals, cells = pivot(rows, row_key, col_key)
    what = "best FID" + (" (bits/dim)" if has_bpd else "")
    lines += ["", f"## {row_key} × {col_key}: {what}", "",
              f"| {row_key} \\ {col_key} | " + " | ".join(_fmt(c, "{}") for c in col_vals) + " |",
              "|---|" + "---:|" * len(col_vals)]
    for rv in row_vals:
        out = []
        for cv in col_vals:
            fid, bpd = cells.get((rv, cv), (None, None))
            out.append(_fmt(fid) + (f" ({_fmt(bpd)})" if has_bpd and bpd is not None else ""))
        lines.append(f"| {_fmt(rv, '{}')} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n" + render_seeds(rows)


app = stage_app()


@app.command()
def compare(exp_json: Path = typer.Option(None, "--exp-json", help="a saved `dvc exp show --json` (default: run it)"),
            rows: str = typer.Option("schedule", help="param (dotted key) for the table's rows"),
            columns: str = typer.Option("prediction", help="param (dotted key) for the table's columns"),
            extra: list[str] = typer.Option([], "--param", help="more params to show per experiment (repeatable)"),
            out: Path = typer.Option(None, help="also write the tables to this markdown file (and rows as .json)"),
            commits: str = typer.Option("head", help="head: experiments of HEAD; all: of every commit"),
            sigma_rel_figure: Path = typer.Option(None, "--sigma-rel-figure",
                                                  help="also plot FID against the EMA length sigma_rel over the "
                                                       "experiments (a PNG) and tabulate it"),
            sigma_rel_steps: int = typer.Option(None, "--sigma-rel-steps",
                                                help="sampling steps of that plot (default: the most in the sweep)")):
    """Ablation table across DVC experiments: best FID (and bits/dim) per rows × columns param values.
    Not a DVC stage: it reads every experiment."""
    one_line(main)(exp_json, rows, columns, extra, out, commits, sigma_rel_figure, sigma_rel_steps)


def main(exp_json: Path | None, row_key: str, col_key: str, extra: list[str], out: Path | None,
         commits: str = "head", sigma_rel_figure: Path | None = None, sigma_rel_steps: int | None = None) -> None:
    if commits not in dvc_api.COMMITS:
        raise InputError(f"commits must be one of {', '.join(dvc_api.COMMITS)}, got {commits!r}")
    if exp_json is not None:
        if not exp_json.is_file():
            raise FileNotFoundError(f"{exp_json} does not exist")
        exp_show = json.loads(exp_json.read_text())
    else:
        exp_show = dvc_api.exp_show(commits)
    rows = experiment_rows(exp_show, [row_key, col_key, *extra])
    text = render(rows, row_key, col_key, extra)
    if sigma_rel_figure is not None:
        from pipeline.experiments import ema_sweep

        points, references = ema_sweep.sweep((name, rev, data) for name, rev, data, _ in runs(exp_show))
        text += "\n" + ema_sweep.render(points, references, sigma_rel_steps)
        if points:
            ema_sweep.plot(points, references, sigma_rel_steps, sigma_rel_figure)
            link = _relative_link(sigma_rel_figure, out) if out is not None else sigma_rel_figure.as_posix()
            text += f"\n![FID vs σ_rel]({link})\n"
    print(text, end="")
    if out is not None:
        write_atomic(out, text)
        if out.suffix == ".md":
            write_atomic(out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
        print(f"compare: {len(rows)} experiments → {out}")


def _relative_link(figure: Path, markdown: Path) -> str:
    import os

    return Path(os.path.relpath(figure.resolve(), markdown.resolve().parent)).as_posix()
