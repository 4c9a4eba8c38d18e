"""``make gpu-check`` (``python3 -m benchmarks gpu-check --out DIR``): the GPU figures of this project
in one run of at most 8 minutes, start-up and compiles included, with the system Python of a GPU
machine that has torch and CUDA and nothing else of ours (what is missing is skipped, with a note).

It cannot come back empty:
- the check is a list of parts (``PLAN``) in order of value: first the inputs of the projection of
  the default ``dvc repro`` (training and sampling rates per path, the stage processes' own costs on
  the real data), then the profiles. Each part is one process with its own time budget, taken from
  the H200 log (``benchmarks/results/h200-2026-12-04``) with a 30% margin (``sized``); a part runs
  only if its budget fits in the time left, and is killed at its budget;
- every figure is written to ``DIR/gpu_check.json`` and the table ``DIR/gpu_check.md`` the moment it
  is measured (``record``, an atomic replace): a run killed at any moment leaves a table of what it
  measured, the parts still pending or cut off named;
- the projection is in the table from the start: from this run's figures where measured, else the
  last measured ones (``CARRIED``, or an earlier report given with ``--carry``), each marked measured,
  carried over or assumed.

``--dry-run`` runs the same code paths at a tiny size on the CPU in about a minute (the test suite
runs it): the CUDA-only parts are skipped and named, and every part's budget is shown. What lands
in ``DIR``: ``gpu_check.json``, ``gpu_check.md``, ``gpu_check.log`` (every part's output),
``profile.txt`` (torch.profiler's tables), ``grids.png`` (the sample cell's grid), and the run
before's report, kept as ``gpu_check.previous.json`` (``--carry`` takes it).
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT, TABLE, LOG = "gpu_check.json", "gpu_check.md", "gpu_check.log"
PREVIOUS = "gpu_check.previous.json"  # the report of the run before, kept when a new one starts
TOTAL = 470.0  # seconds for the whole check on a GPU: 8 minutes, less 10 s for Python and make
DRY_TOTAL, DRY_LIMIT = 600.0, 120.0  # a dry run (tiny sizes on a CPU): in all, and per part
MARGIN = 1.3
START = 5.0  # a part's process start on the H200: torch, the CUDA context (the whole ema stage took 6.3 s)
TIMING = 4.0  # after a part's first calls: warm-up, the first timed calls, 3 s of steady timing
STAGE_MODULES = ("pydantic", "typer", "yaml")  # what the pipeline's stage commands need beyond torch


def sized(*seconds: float) -> int:
    """A budget: the H200's seconds for a part, plus 30%."""
    return math.ceil(MARGIN * sum(seconds))


@dataclass(frozen=True)
class Part:
    name: str
    budget: int  # seconds on an H100 or H200
    basis: str  # the H200 figures (2026-12-04) the budget is sized from
    cuda_only: str = ""  # why a dry run on a CPU skips it ("" = it runs there too)
    needs: tuple[str, ...] = ()  # parts that must have succeeded first
    modules: tuple[str, ...] = ()  # Python packages it needs beyond torch
    projection: bool = True  # its figures are inputs of the projection (``project``)
    bf16: bool = False  # measures bf16 itself: skipped on a CPU without native bf16


GRAPHS = "CUDA graphs"
PLAN = [  # in order of value: the projection's inputs, then the profiles
    Part("train.cudagraphs", sized(START, 12.6, TIMING), "first 3 steps 12.6 s", GRAPHS),
    Part("sample.cudagraphs", sized(START, 0.5, TIMING), "first call 0.5 s", GRAPHS),
    Part("stage.prepare", sized(12.8), "prepare 12.8 s", modules=STAGE_MODULES),
    Part("stage.classifier", sized(29.9), "classifier 29.9 s", needs=("stage.prepare",), modules=STAGE_MODULES),
    Part("stage.train", sized(12.9, 12.6, 300 / 40.6), "12.9 s outside training (66.9 − 54); 300 steps on "
         "cudagraphs: 12.6 s to the first, then 40.6 steps/s", needs=("stage.prepare",), modules=STAGE_MODULES),
    Part("stage.ema", sized(6.3), "ema 6.3 s", needs=("stage.train",), modules=STAGE_MODULES),
    Part("stage.sample", sized(12.4), "sample ddim-10, 5,000 images: 12.4 s", needs=("stage.ema",),
         modules=STAGE_MODULES),
    Part("stage.fid_ref", sized(11.6), "fid-ref 11.6 s (the first run)", needs=("stage.classifier",),
         modules=STAGE_MODULES),
    Part("stage.fid", sized(30.0), "a fid cell about 30 s (the first run, 4 processes sharing the GPU)",
         needs=("stage.sample", "stage.fid_ref"), modules=STAGE_MODULES),
    Part("stage.nll", sized(6.3, 100 * 1000 / 13000), "not measured: a process as ema's 6.3 s, 100 images × "
         "1,000 float32 evaluations at half the bf16 rate", needs=("stage.ema",), modules=STAGE_MODULES),
    Part("likelihood.cudagraphs", sized(START, 1.0, TIMING), "not measured: as sample.cudagraphs, float32", GRAPHS),
    Part("train.reduce-overhead", sized(START, 84.2, TIMING), "first 3 steps 84.2 s (compile, cache cold)", GRAPHS),
    Part("sample.reduce-overhead", sized(START, 24.7, TIMING), "first call 24.7 s (compile, cache cold)", GRAPHS),
    # the profiles
    Part("warm.train", sized(START, 24.0, 2.0), "the train stage's first step with the cache warm: 24 s", GRAPHS, projection=False),
    Part("train.step-graph", sized(START, 84.2, TIMING), "not measured (out of time after 49 s): as "
         "reduce-overhead's cold compile", GRAPHS),
    Part("profile.reduce-overhead", sized(START, 24.0, 3.0), "the compile with the cache warm 24 s; 10 profiled "
         "steps", GRAPHS, projection=False),
    Part("profile.step-graph", sized(START, 24.0, 3.0), "not measured: as profile.reduce-overhead (the forward's "
         "compile warm from train.step-graph)", GRAPHS, projection=False),
    Part("train.none", sized(START, 4.2, TIMING, 3.0), "first 3 steps 4.2 s; its profile and the EMA update 3 s"),
    Part("warm.sample", sized(START, 10.0), "not measured: about a third of the cold 24.7 s", GRAPHS, projection=False),
    Part("sample.none", sized(START, 0.4, TIMING), "first call 0.4 s"),
    Part("sample.autocast", sized(START, 2.5, TIMING), "first call 2.5 s", projection=False, bf16=True),
    Part("train.default", sized(START, 84.2, TIMING), "not measured: as reduce-overhead's cold compile",
         "inductor compiles for minutes on a CPU"),
    Part("peer.eager", sized(START, 3.0, 2 * (4.2 + TIMING), 2 * (0.5 + TIMING)), "import diffusers 3 s; each "
         "model's first 3 eager steps 4.2 s and first graphed call 0.5 s", modules=("diffusers",), projection=False),
    Part("peer.compiled", sized(START, 3.0, 24.0 + 84.2 + 24.7 / 3 + 24.7 + 4 * TIMING), "ours warm, diffusers' "
         "cold: training 24 + 84.2 s, sampling 8 + 24.7 s", GRAPHS, modules=("diffusers",), projection=False),
    Part("ddp", sized(2 * (12.9 + 300 / 40.6), 12.6, 84.2), "two train stage processes of 300 steps (12.9 s "
         "outside training each); one compiles on cudagraphs (12.6 s), the other on default (as 84.2 s)",
         needs=("stage.prepare",), modules=STAGE_MODULES, projection=False),
]
PARTS = {p.name: p for p in PLAN}

# the experiment: params.yaml with these overrides, on the real data; its one sample cell is CELL
CELL = {"gpu": ("ddim", 10), "ci": ("ddim", 2)}
EXPERIMENT = {"gpu": {"train.steps": 300, "train.checkpoint_every": 0, "train.sample_every": 0,
                      "nll.num_images": 100, "nll.batch_size": 100},
              "ci": {"timesteps": 100, "model.ch": 8, "model.ch_mult": [1, 2], "model.num_res_blocks": 1,
                     "model.attn_resolutions": [14], "train.steps": 6, "train.batch_size": 8,
                     "train.warmup_steps": 2, "train.log_every": 2, "train.sample_every": 0,
                     "train.checkpoint_every": 0, "classifier.steps": 20, "classifier.batch_size": 32,
                     "classifier.arch": {"width": 8, "feature_dim": 16}, "sample.num_samples": 24,
                     "sample.batch_size": 12, "fid.batch_size": 64, "fid.kid_subset_size": 12,
                     "nll.num_images": 2, "nll.batch_size": 2}}
DDP_STEPS = {"gpu": 300, "ci": 4}

# The last measured figures, carried over into the projection where this run has none (NVIDIA H200,
# torch 2.11, 2026-12-04: benchmarks/results/h200-2026-12-04 and shared/gpu). Paths: (rate, compile s).
CARRIED_FROM = "H200, 2026-12-04"
CARRIED = {
    "train.none": {"images_per_second": 2166.0, "compile_seconds": 4.0},
    "train.cudagraphs": {"images_per_second": 5202.0, "compile_seconds": 12.5},
    "train.reduce-overhead": {"images_per_second": 6894.0, "compile_seconds": 84.1},
    "sample.none": {"image_steps_per_second": 25622.0, "compile_seconds": 0.0},
    "sample.cudagraphs": {"image_steps_per_second": 26029.0, "compile_seconds": 0.5},
    "sample.reduce-overhead": {"image_steps_per_second": 72210.0, "compile_seconds": 24.6},
    "stage.prepare": {"seconds": 12.8},
    "stage.classifier": {"seconds": 29.9},
    "stage.train": {"seconds": 66.9, "train_seconds": 54.0},
    "stage.ema": {"seconds": 6.3},
    "stage.sample": {"seconds": 11.2, "sample_seconds": 5.2},
    "stage.fid_ref": {"seconds": 11.6},
    "stage.fid": {"seconds": 30.0},
}
ASSUMED = {"nll process": 10.0, "small stage": 8.0}  # never measured on a GPU
# the default `dvc repro` (params.yaml; tests/test_performance.py checks it against the file)
DEFAULT_REPRO = {"train_steps": 20000, "batch_size": 128, "num_samples": 5000,
                 "samplers": ("ddpm", "ddim", "dpmpp", "euler", "heun"), "steps": (10, 50, 100, 1000),
                 "evaluations_per_step": {"heun": 2}, "nll_images": 1000, "timesteps": 1000,
                 "small_stages": ("check", "fid_floor", "denoise", "report", "log")}


# --------------------------------------------------------------------------- the report on disk
def read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def save(out: Path, report: dict) -> None:
    """The report and its table, each replaced atomically (a kill leaves the old or the new file)."""
    report["seconds"] = round(time.time() - report["started_at"], 1)
    report["projection"] = project(report)
    for name, text in ((REPORT, json.dumps(report, indent=1, default=str)), (TABLE, table(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def record(out: Path, key: str, value) -> None:
    """Put one measured figure into the report in ``out`` and rewrite its table: what a part calls
    the moment it has a figure (the parts run one at a time, so nothing else writes meanwhile)."""
    report = read(out / REPORT)
    if report is None:  # a part run on its own, outside a check
        report = new_report(environment_stub(), dry_run=False, budget=0.0, carry=None)
    report["figures"][key] = value
    save(out, report)


def set_status(out: Path, report: dict, part: str, status: str, seconds: float | None = None) -> dict:
    """The report with ``part``'s status (re-read: the part's own process may have added figures)."""
    report = read(out / REPORT) or report
    for row in report["plan"]:
        if row["part"] == part:
            row["status"], row["seconds"] = status, seconds
    save(out, report)
    return report


def new_report(env: dict, dry_run: bool, budget: float, carry: Path | None, limits: dict | None = None) -> dict:
    carried, source = carried_figures(carry)
    return {"format": 2, "environment": env, "dry_run": dry_run, "budget": budget, "started_at": time.time(),
            "plan": [{"part": p.name, "budget": p.budget, "limit": (limits or {}).get(p.name, p.budget),
                      "basis": p.basis, "projection": p.projection, "status": "pending", "seconds": None}
                     for p in PLAN],
            "figures": {}, "notes": [], "carried": carried, "carried_from": source}


def carried_figures(carry: Path | None) -> tuple[dict, str]:
    """The figures the projection falls back on: ``CARRIED``, or the measured figures of an earlier
    report (``--carry``), named by its machine and date."""
    if carry is None:
        return CARRIED, CARRIED_FROM
    old = read(carry)
    if not old or "figures" not in old:
        raise SystemExit(f"error: --carry {carry} is not a gpu_check.json of this format (format 2)")
    ok = {k: v for k, v in old["figures"].items() if isinstance(v, dict) and "error" not in v
          and v.get("status", "ok") == "ok"}
    env = old.get("environment", {})
    return {**CARRIED, **ok}, f"{env.get('device_name', '?')}, {str(env.get('started', '?'))[:10]}"


# --------------------------------------------------------------------------- the projection
def project(report: dict) -> dict:
    """The default ``dvc repro``'s wall time on this GPU: training and every sample cell on the path
    that is fastest for its amount of work, compile included (what ``auto`` picks:
    ``ddpm.acceleration.compile_pays``), plus each stage process's own cost as the experiment measured
    it (start-up, loading, writing), a fid process per cell, nll's evaluations, the other stages.
    Every input is this run's figure where measured, else carried over, else assumed; each term says
    which. An estimate, given with its terms."""
    figures, carried, source = report["figures"], report["carried"], report["carried_from"]
    used: dict[str, str] = {}

    def get(key: str, *fields: str):
        """``fields`` of figure ``key``: measured in this run, else carried over; None when neither."""
        for where, d in (("measured", figures), (f"carried over ({source})", carried)):
            v = d.get(key)
            if isinstance(v, dict) and "error" not in v and v.get("status", "ok") == "ok" \
                    and all(v.get(f) is not None for f in fields):
                used[key] = where
                return [v[f] for f in fields]
        return None

    def paths(group: str, unit: str):
        found = {}
        for mode in ("none", "cudagraphs", "reduce-overhead", "step-graph", "default"):
            v = get(f"{group}.{mode}", unit, "compile_seconds")
            if v:
                found[mode] = v
        return found

    def best(found: dict, work: float) -> tuple[float, str]:
        return min((work / rate + start, mode) for mode, (rate, start) in found.items())

    r = DEFAULT_REPRO
    terms, notes = {}, []
    train_paths, infer_paths = paths("train", "images_per_second"), paths("sample", "image_steps_per_second")
    seconds, mode = best(train_paths, r["train_steps"] * r["batch_size"])
    terms[f"train: {r['train_steps']:,} steps of {r['batch_size']} on {mode}"] = (seconds, [f"train.{mode}"])
    stage = {name: get(f"stage.{name}", "seconds") for name in ("prepare", "classifier", "ema", "fid_ref", "fid")}
    t = get("stage.train", "seconds", "train_seconds")
    terms["train process: start, data, outputs"] = (t[0] - t[1] if t else 15.0, ["stage.train"])
    s = get("stage.sample", "seconds", "sample_seconds")
    fixed = s[0] - s[1] if s else 10.0
    cells = [(sampler, k) for sampler in r["samplers"] for k in r["steps"]]
    sampling = sum(best(infer_paths, r["num_samples"] * k * r["evaluations_per_step"].get(sampler, 1))[0]
                   for sampler, k in cells)
    terms[f"sample: {len(cells)} cells of {r['num_samples']:,}, fastest path each"] = (
        sampling + len(cells) * fixed, [f"sample.{m}" for m in infer_paths] + ["stage.sample"])
    terms[f"fid: {len(cells)} cells"] = (len(cells) * (stage["fid"][0] if stage["fid"] else 10.0), ["stage.fid"])
    lik = get("likelihood.cudagraphs", "image_steps_per_second", "compile_seconds")
    if lik is None:
        lik = get("sample.cudagraphs", "image_steps_per_second", "compile_seconds")
        used["likelihood.cudagraphs"] = "assumed: the bf16 rate (float32 never measured)"
    n = get("stage.nll", "seconds", "nll_seconds")
    if n is None:
        used["stage.nll"] = f"assumed: {ASSUMED['nll process']:.0f} s"
    terms[f"nll: {r['nll_images']:,} images × {r['timesteps']:,} float32 evaluations"] = (
        r["nll_images"] * r["timesteps"] / lik[0] + lik[1] + (n[0] - n[1] if n else ASSUMED["nll process"]),
        ["likelihood.cudagraphs", "stage.nll"])
    for name in ("prepare", "classifier", "ema", "fid_ref"):
        if stage[name] is None:
            notes.append(f"stage.{name}: no figure")
    terms["prepare, classifier, ema, fid_ref"] = (sum(v[0] for k, v in stage.items() if k != "fid" and v),
                                                  [f"stage.{k}" for k in ("prepare", "classifier", "ema", "fid_ref")])
    small = r["small_stages"]
    used["small stages"] = f"assumed: {ASSUMED['small stage']:.0f} s each"
    terms[f"{', '.join(small)}: {len(small)} processes"] = (len(small) * ASSUMED["small stage"], ["small stages"])
    rows = [{"term": name, "seconds": round(sec, 1), "inputs": {k: used.get(k, "none") for k in keys}}
            for name, (sec, keys) in terms.items()]
    marks = [v for v in used.values()]
    return {"seconds": round(sum(row["seconds"] for row in rows), 1), "terms": rows, "notes": notes,
            "measured": sum(m == "measured" for m in marks), "carried_over": sum(m.startswith("carried") for m in marks),
            "assumed": sum(m.startswith("assumed") for m in marks)}


# --------------------------------------------------------------------------- the table
def _f(v, spec="{:,.0f}") -> str:
    return "—" if v is None else spec.format(v)


def summary(name: str, figures: dict) -> str:
    """One line of what part ``name`` measured."""
    keys = [k for k in figures if k == name or k.startswith(name + ".") or
            (name == "train.none" and k in ("profile.none", "ema_update"))]
    parts = []
    for k in keys:
        v = figures[k]
        if not isinstance(v, dict):
            continue
        if "error" in v:
            parts.append(f"{k}: error: {v['error'][:100]}")
        elif "images_per_second" in v and k.startswith(("train.", "peer.")):
            parts.append(f"{k.removeprefix(name + '.') if k != name else ''} {_f(v['images_per_second'])} img/s"
                         + (f", first 3 steps {v['first_3_steps_seconds']:.1f} s" if "first_3_steps_seconds" in v else "")
                         + (f", MFU {v['mfu']:.1%}" if v.get("mfu") else "") + (f" ({v['path']})" if v.get("path") else ""))
        elif "image_steps_per_second" in v:
            parts.append(f"{k.removeprefix(name + '.') if k != name else ''} {_f(v['image_steps_per_second'])} "
                         f"image-steps/s, first call {v['first_call_seconds']:.1f} s"
                         + (f", MFU {v['mfu']:.1%}" if v.get("mfu") else "") + (f" ({v['path']})" if v.get("path") else ""))
        elif "host_ms_per_step" in v:
            parts.append(f"profile: host {v['host_ms_per_step']:.1f} / GPU {v['gpu_ms_per_step']:.1f} ms per step, "
                         f"{v['launches_per_step']:.0f} launches")
        elif "averages_ms" in v:
            parts.append(f"EMA update: 3 × AveragedModel {v['averaged_model_x3_ms']:.2f} ms, Averages "
                         f"{v['averages_ms']:.2f} ms")
        elif "calls_seconds" in v:
            phases = v.get("phases_seconds") or {}
            top = ", ".join(f"{p} {s:.1f}" for p, s in list(phases.items())[:3])
            cache = {k2: v2 for group in (v.get("counters") or {}).values() for k2, v2 in group.items() if "cache" in k2}
            parts.append(f"import {v['import_dynamo_inductor_seconds']:.1f} s, calls "
                         + " / ".join(f"{c:.1f}" for c in v["calls_seconds"]) + f" s ({v.get('unit')}); {top}; "
                         + ", ".join(f"{k2} {v2}" for k2, v2 in cache.items()))
        elif k.startswith("stage."):
            extra = [f"{label} {_f(v.get(f), spec)}" for f, label, spec in (
                ("images_per_second", "img/s", "{:,.0f}"), ("test_accuracy", "accuracy", "{:.3f}"),
                ("fid", "FID", "{:.2f}"), ("kid_mean", "KID", "{:.4f}"), ("precision", "precision", "{:.3f}"),
                ("recall", "recall", "{:.3f}"), ("bits_per_dim", "bits/dim", "{:.3f}")) if v.get(f) is not None]
            parts.append(f"{_f(v.get('seconds'), '{:.1f}')} s the process" + "".join(f", {e}" for e in extra)
                         + (f" ({v['path']})" if v.get("path") else ""))
        elif "speedup" in v:
            parts.append(f"{v['processes']} processes: speed-up {_f(v.get('speedup'), '{:.2f}')}×")
    return "; ".join(p.strip() for p in parts)


def table(report: dict) -> str:
    """The check's one table (markdown): the projection with its inputs marked, then every part."""
    env, figures, proj = report["environment"], report["figures"], report["projection"]
    done = [row for row in report["plan"] if row["status"] == "ok"]
    rows = [f"# gpu-check: {env.get('device_name')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
            f"{env.get('started')}", ""]
    if report["dry_run"]:
        rows += ["**Dry run**: tiny sizes on the CPU, to try the code paths; its figures are no GPU's, and the "
                 "projection below mixes them with carried-over GPU rates.", ""]
    rows += [f"{report['seconds']:.0f} s of the {report['budget']:.0f} s budget; {len(done)} of "
             f"{len(report['plan'])} parts done." + (" Notes: " + "; ".join(report["notes"]) if report["notes"] else ""),
             "", f"## Projected default `dvc repro`: {proj['seconds'] / 60:.1f} min",
             "", f"Inputs: {proj['measured']} measured in this run, {proj['carried_over']} carried over "
                 f"({report['carried_from']}), {proj['assumed']} assumed.", "",
             "| term | seconds | from |", "|---|---:|---|"]
    for row in proj["terms"]:
        rows.append(f"| {row['term']} | {row['seconds']:,.0f} | "
                    + "; ".join(f"{k}: {v}" for k, v in row["inputs"].items()) + " |")
    limits = {row["limit"] for row in report["plan"] if row["limit"] != row["budget"]}
    rows += ["", "## Parts, in order of value (budgets on a GPU: the H200 log's seconds + 30%"
             + (f"; here each part may take {max(limits):.0f} s" if limits else "") + ")", "",
             "| # | part | budget s | status | seconds | figures |", "|---:|---|---:|---|---:|---|"]
    for k, row in enumerate(report["plan"], 1):
        name = row["part"] + (" ᵖ" if row["projection"] else "")
        rows.append(f"| {k} | {name} | {row['budget']} | {row['status']} | {_f(row['seconds'], '{:.1f}')} | "
                    f"{summary(row['part'], figures)} |")
    rows += ["", "ᵖ an input of the projection."]
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- running parts
def run_process(cmd: list[str], cwd: Path, log: Path, timeout: float, env: dict) -> tuple[str, float]:
    """Run ``cmd`` in its own process group (killed whole at the timeout, or when the check itself is
    stopped), its output appended to ``log``; a failure's status ends with its last line of output."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        offset = f.tell()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
        finally:  # also on Ctrl-C or SIGTERM to the check: no part outlives it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if status.startswith("failed"):
        with open(log, errors="replace") as f:
            f.seek(offset)
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        if lines:
            status += f": {lines[-1][:200]}"
    return status, round(time.perf_counter() - start, 1)


def child_env(cache: Path, pythonpath: Path = REPO, **extra) -> dict:
    path = os.pathsep.join(p for p in (str(pythonpath), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache),
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "PIPELINE_LIVE_MLFLOW": "0", "DVC_NO_ANALYTICS": "1",
            **extra}


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def set_dotted(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def parse_sets(sets) -> dict:
    """``--set key=value`` options as {dotted key: YAML value}."""
    import yaml

    out = {}
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set takes key=value, got {s!r}")
        out[key] = yaml.safe_load(value)
    return out


class Experiment:
    """The pipeline's own stage commands (``python -m pipeline.stages.<stage>``, as dvc.yaml runs them,
    without DVC) in a workspace of their own: a copy of ``ddpm/`` and ``pipeline/`` and params.yaml
    with ``EXPERIMENT``'s overrides, on the real data."""

    def __init__(self, work: Path, size: str, overrides: dict, device: str):
        self.ws, self.size, self.overrides, self.device = work / "experiment", size, overrides, device
        self.sampler, self.steps = CELL[size]

    def create(self) -> None:
        import yaml

        if (self.ws / "params.yaml").is_file():
            return
        for folder in ("ddpm", "pipeline"):
            shutil.copytree(REPO / folder, self.ws / folder, ignore=shutil.ignore_patterns("__pycache__"))
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        for key, value in {**EXPERIMENT[self.size], **self.overrides}.items():
            set_dotted(params, key, value)
        (self.ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    @property
    def cell(self) -> str:
        return f"{self.sampler}-{self.steps}"

    def command(self, stage: str) -> list[str]:
        dev = ["--device", self.device]
        args = {"prepare": ["--out", "data/prepared"], "classifier": dev, "train": ["--no-live", *dev], "ema": [],
                "sample": ["--checkpoint", "models/model_ema.pt", "--sampler", self.sampler, "--steps",
                           str(self.steps), "--out", f"samples/{self.cell}", *dev],
                "fid_ref": dev,
                "fid": ["--samples", f"samples/{self.cell}/samples.pt", "--reference", "data/reference/stats.pt",
                        "--classifier", "models/classifier.pt", "--out", f"metrics/cells/{self.cell}.json", *dev],
                "nll": dev}[stage]
        return [sys.executable, "-m", f"pipeline.stages.{stage}", *args]

    def figures(self, stage: str) -> dict:
        """What the stage's own output files say (its inner seconds, rates, path, metrics)."""
        ws = self.ws

        def block(path: str, key: str) -> dict:
            return (read(ws / path) or {}).get(key) or {}

        if stage == "classifier":
            return {"test_accuracy": block("metrics/classifier.json", "classifier").get("test_accuracy"),
                    "train_seconds": (read(ws / "logs/classifier_timing.json") or {}).get("seconds")}
        if stage == "train":
            t = read(ws / "logs/train_timing.json") or {}
            return {"train_seconds": t.get("seconds"), "images_per_second": t.get("images_per_second"),
                    "path": t.get("path"), "final_loss": block("metrics/train.json", "train").get("final_loss")}
        if stage == "sample":
            info = read(ws / f"samples/{self.cell}/info.json") or {}
            return {"sample_seconds": info.get("seconds"), "images_per_second": info.get("images_per_second"),
                    "num_samples": info.get("num_samples"), "path": info.get("path"), "cell": self.cell}
        if stage == "fid":
            m = read(ws / f"metrics/cells/{self.cell}.json") or {}
            return {k: m.get(k) for k in ("fid", "kid_mean", "precision", "recall", "num_samples")}
        if stage == "nll":
            n = block("metrics/nll.json", "nll")
            return {"nll_seconds": n.get("seconds"), "bits_per_dim": n.get("bits_per_dim"),
                    "test_images": n.get("test_images")}
        return {}


def ddp_part(processes: int, exp: Experiment, log: Path, cache: Path, limit: float) -> dict:
    """One process, then ``processes`` under torchrun, training the experiment's model for a few steps."""
    import yaml

    ws = exp.ws
    params = yaml.safe_load((ws / "params.yaml").read_text())
    set_dotted(params, "train.steps", DDP_STEPS[exp.size])
    (ws / "ddp").mkdir(exist_ok=True)
    (ws / "ddp/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs, stop = {}, time.monotonic() + limit
    for n in (1, processes):
        d = f"ddp/{n}"
        args = ["--params", "ddp/params.yaml", "--data", "data/prepared/train.pt", "--out", f"{d}/model.pt",
                "--metrics", f"{d}/train.json", "--plot", f"{d}/loss.csv", "--lr-plot", f"{d}/lr.csv",
                "--timing", f"{d}/timing.json", "--state", f"{d}/state.pt", "--system-metrics", f"{d}/system.json",
                "--resume", "never", "--snapshots", f"{d}/snapshots", "--samples", f"{d}/samples",
                "--mlflow-run", f"{d}/mlflow.json", "--no-live", "--device", exp.device]
        launcher = [sys.executable] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        status, seconds = run_process([*launcher, "-m", "pipeline.stages.train", *args], ws, log,
                                      stop - time.monotonic(), child_env(cache, ws, OMP_NUM_THREADS="1"))
        runs[n] = {"status": status, "seconds": seconds, "timing": read(ws / d / "timing.json")}
    one, many = (runs[k]["timing"] or {} for k in (1, processes))
    speedup = (many["images_per_second"] / one["images_per_second"]
               if one.get("images_per_second") and many.get("images_per_second") else None)
    return {"processes": processes, "steps": DDP_STEPS[exp.size], "runs": runs, "speedup": speedup}


def environment(device: str) -> dict:
    import torch

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": str(dev), "device_name": name, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": list(os.getloadavg())}


def environment_stub() -> dict:
    return {"device_name": "?", "torch": "?", "cuda": "?", "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def selected(plan: list[Part], names: list[str] | None) -> set[str]:
    """The parts named (a name, or a prefix before a dot: ``stage`` is every stage part); all when none."""
    if not names:
        return {p.name for p in plan}
    unknown = [n for n in names if not any(p.name == n or p.name.startswith(n + ".") for p in plan)]
    if unknown:
        raise SystemExit(f"error: unknown parts {unknown}; choose from {', '.join(p.name for p in plan)}")
    return {p.name for p in plan if any(p.name == n or p.name.startswith(n + ".") for n in names)}


def main(out: Path, dry_run: bool = False, device: str = "auto", sets: list[str] = (), ddp_processes: int | None = None,
         budget: float | None = None, data: str | None = None, parts: list[str] | None = None,
         carry: Path | None = None) -> dict:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(device).type == "cuda"
    if not cuda and not dry_run:
        print("gpu-check: no CUDA device here, so this is a dry run (tiny sizes on the CPU)", flush=True)
        dry_run = True
    size = "ci" if dry_run else "gpu"
    overrides = parse_sets(sets) if sets else {}
    if data:
        overrides.update({"data.root": data, "data.download": False})
    if ddp_processes is None:
        ddp_processes = torch.cuda.device_count() if cuda and torch.cuda.device_count() > 1 else 0
    chosen = selected(PLAN, parts)
    carried_figures(carry)  # a bad --carry fails here, before anything in --out is touched
    total = budget or (DRY_TOTAL if dry_run else TOTAL)
    limits = {p.name: DRY_LIMIT if dry_run else p.budget for p in PLAN}
    out.mkdir(parents=True, exist_ok=True)
    if (out / REPORT).is_file():  # the last run's figures are never lost to a new run
        os.replace(out / REPORT, out / PREVIOUS)
    for name in (TABLE, LOG, "profile.txt", "grids.png"):
        (out / name).unlink(missing_ok=True)
    (out / LOG).write_text("")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = work / "inductor-cache"  # cold for the first part: the compile a first user pays
    exp = Experiment(work, size, overrides, device)
    report = new_report(environment(device), dry_run, total, carry, limits)
    save(out, report)
    print(f"gpu-check: {len(PLAN)} parts in order of value, {total:.0f} s in all"
          + (" (dry run: tiny sizes, CPU)" if dry_run else ""), flush=True)
    for k, p in enumerate(PLAN, 1):
        print(f"  {k:2d}. {p.name:24s} budget {p.budget:4d} s" + (f" ({limits[p.name]:.0f} s here)" if dry_run else "")
              + f"  {'projection input; ' if p.projection else ''}sized from: {p.basis}", flush=True)
    start = time.monotonic()
    deadline = start + total
    main_thread = threading.current_thread() is threading.main_thread()  # only there can it catch signals
    previous = signal.signal(signal.SIGTERM, stopped) if main_thread else None
    try:
        for p in PLAN:
            report = run_one(p, report, chosen, cuda, dry_run, size, device, exp, ddp_processes, deadline, limits,
                             out, cache)
    finally:  # stopped or not: the running part marked as cut off, the table written, the workspace gone
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        report = read(out / REPORT) or report
        for row in report["plan"]:
            if row["status"] == "running":
                row["status"] = "cut off: the check was stopped"
        save(out, report)
        shutil.rmtree(work, ignore_errors=True)
    print((out / TABLE).read_text(), flush=True)
    return report


def stopped(signum, frame):
    """SIGTERM (a time limit, a scheduler) stops the check as Ctrl-C does: the ``finally`` of ``main``
    runs, killing the running part and writing the table."""
    raise KeyboardInterrupt(f"signal {signum}")


def skip_reason(p: Part, report: dict, chosen: set, cuda: bool, dry_run: bool, ddp_processes: int, left: float,
                limit: float) -> str | None:
    from benchmarks.gpu_parts import native_bf16

    status = {row["part"]: row["status"] for row in report["plan"]}
    if p.name not in chosen:
        return "not asked for (--parts)"
    if p.cuda_only and not cuda:
        return f"CUDA only ({p.cuda_only})"
    if p.bf16 and not cuda and not native_bf16("cpu"):
        return "this CPU has no native bf16 (oneDNN), where it runs about 100× slower than float32"
    if p.name == "ddp" and ddp_processes < 2:
        return f"needs two or more GPUs (--ddp-processes; {ddp_processes} here)"
    gone = missing(*p.modules)
    if gone:
        return f"{', '.join(gone)} not installed"
    unmet = [n for n in p.needs if status.get(n) != "ok"]
    if unmet:
        return f"needs {', '.join(unmet)}"
    if limit > left:
        return f"out of time: needs {limit:.0f} s, {max(left, 0):.0f} s left"
    return None


def run_one(p: Part, report: dict, chosen: set, cuda: bool, dry_run: bool, size: str, device: str, exp: Experiment,
            ddp_processes: int, deadline: float, limits: dict, out: Path, cache: Path) -> dict:
    limit = limits[p.name]
    reason = skip_reason(p, report, chosen, cuda, dry_run, ddp_processes, deadline - time.monotonic(), limit)
    if reason:
        return set_status(out, report, p.name, f"skipped: {reason}")
    report = set_status(out, report, p.name, "running")
    print(f"gpu-check: {p.name} (budget {limit:.0f} s)", flush=True)
    threads = {"OMP_NUM_THREADS": "1"} if dry_run else {}
    if p.name.startswith("stage."):
        stage = p.name.split(".", 1)[1]
        exp.create()
        status, seconds = run_process(exp.command(stage), exp.ws, out / LOG, limit, child_env(cache, exp.ws, **threads))
        record(out, p.name, {"status": status, "seconds": seconds, **exp.figures(stage)})
        grid = exp.ws / f"samples/{exp.cell}/grid.png"
        if stage == "sample" and grid.is_file():
            shutil.copyfile(grid, out / "grids.png")
    elif p.name == "ddp":
        result = ddp_part(ddp_processes, exp, out / LOG, cache, limit)
        status, seconds = ("ok" if result["speedup"] else "failed"), sum(r["seconds"] for r in result["runs"].values())
        record(out, "ddp", result)
    else:
        status, seconds = run_process([sys.executable, "-m", "benchmarks.gpu_parts", p.name, "--out", str(out),
                                       "--size", size, "--device", device], REPO, out / LOG, limit,
                                      child_env(cache, **threads))
        report = read(out / REPORT) or report
        errors = [k for k, v in report["figures"].items() if (k == p.name or k.startswith(p.name + "."))
                  and isinstance(v, dict) and "error" in v]
        if status == "ok" and errors:
            status = f"failed: {', '.join(errors)}"
    if status != "ok":
        report = read(out / REPORT) or report
        report["notes"].append(f"{p.name} {status}")
    return set_status(out, report, p.name, status, seconds)


def cli(argv=None) -> None:
    """``python3 -m benchmarks gpu-check``: argparse only, so that it runs where typer is missing."""
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for its files (a report already there is kept as gpu_check.previous.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU, CUDA-only parts skipped and named: the code paths in a minute")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param of the experiment (YAML value; repeatable)")
    parser.add_argument("--data", help="data.root of the experiment (default: params.yaml's)")
    parser.add_argument("--ddp-processes", type=int, help="processes of the ddp part (default: the GPUs, if > 1)")
    parser.add_argument("--budget", type=float, help=f"seconds for the whole check (default {TOTAL:.0f})")
    parser.add_argument("--parts", help="comma-separated parts, or their prefixes (stage, train, ...): a second "
                                        "window for what the first left out")
    parser.add_argument("--carry", type=Path, help="an earlier gpu_check.json: its figures are carried over into the "
                                                   "projection where this run has none (default: the H200's)")
    a = parser.parse_args(argv)
    if a.ddp_processes is not None and (a.ddp_processes == 1 or a.ddp_processes < 0):
        parser.error(f"--ddp-processes must be 0 (skip) or at least 2, got {a.ddp_processes}")
    try:
        main(a.out, a.dry_run, a.device, a.sets, a.ddp_processes, a.budget, a.data,
             a.parts.split(",") if a.parts else None, a.carry)
    except KeyboardInterrupt:
        print(f"gpu-check: stopped; {a.out / TABLE} has what was measured", file=sys.stderr)
        sys.exit(130)
