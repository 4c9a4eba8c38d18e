"""``make gpu-check`` (``python3 -m benchmarks gpu-check --out DIR``): every GPU figure of this
project in one run of at most 8 minutes, with the system Python of a GPU machine that has torch
and CUDA and nothing else of ours (what is missing is skipped, with a note saying so).

The parts, in this order, each a subprocess with its own time limit inside one budget, so a
part that fails or runs long leaves the others' figures and a first run on an unknown GPU
cannot end without printing a table:

  train       ``ddpm.training.train`` at the default config per compile mode (none, cudagraphs,
              reduce-overhead, step-graph, default): steady img/s, compile seconds, MFU; torch.profiler's host
              and GPU ms per step; the EMA update (``benchmarks.gpu_parts``)
  sample      ddim-10 at batch 1000 per inference path: autocast (the old path), bf16 weights cast
              once, + CUDA graphs, + compile: image-steps/s, MFU
  warm        a fresh process with inductor's cache warm: what each stage process pays to compile
  experiment  the pipeline's own stage commands (``python -m pipeline <stage> --device cuda``, no DVC)
              on the real data with the fast path (``auto``): prepare, classifier, train for
              ``EXPERIMENT["train.steps"]`` steps, ema, the sample cells of ``EXPERIMENT_CELLS``,
              fid-ref, fid per cell, nll: each stage's wall time, FID per cell, the grids
              (needs pydantic and typer; torch-fidelity for the fid stages; the data set)
  peer        ours against diffusers' UNet2DModel (needs diffusers), eager and on the best paths
  ddp         with more than one GPU: ``torchrun`` training against one process

It prints one table and writes at most 8 files to ``--out``: ``gpu_check.json`` (everything),
``gpu_check.md`` (the table), ``gpu_check.log`` (every part's output), ``profile.txt``
(torch.profiler's tables) and ``grids.png`` (the experiment's sample grids). The projection of
the default ``dvc repro``'s wall time is computed from the measured stage rates (``project``).
``--size ci`` runs tiny configs on the CPU in seconds per part (the test suite runs it).
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET = {"gpu": 470.0, "ci": 600.0}  # seconds for the whole check
LIMITS = {"gpu": {"train": 200, "sample": 80, "warm": 45, "experiment": 150, "peer": 110, "ddp": 60},
          "ci": {"train": 120, "sample": 120, "warm": 120, "experiment": 300, "peer": 120, "ddp": 120}}
# the experiment: params.yaml with these overrides; EXPERIMENT_CELLS sampled and scored. At 1,500
# steps, as the first GPU run's grids and FIDs (README: ddpm-10 42.1, ddim-10 35.9, dpmpp-20 21.9,
# ddpm-50 23.5), so the fast path's are comparable with the eager path's.
EXPERIMENT = {"gpu": {"train.steps": 1500, "nll.num_images": 250},
              "ci": {"timesteps": 100, "model.ch": 8, "model.ch_mult": [1, 2], "model.num_res_blocks": 1,
                     "model.attn_resolutions": [14], "train.steps": 6, "train.batch_size": 8,
                     "train.warmup_steps": 2, "train.log_every": 2, "train.sample_every": 0,
                     "classifier.steps": 20, "classifier.batch_size": 32,
                     "classifier.arch": {"width": 8, "feature_dim": 16}, "sample.samplers": ["ddim", "ddpm"],
                     "sample.steps": [2], "sample.num_samples": 24,
                     "sample.batch_size": 12, "fid.batch_size": 64, "fid.kid_subset_size": 12,
                     "nll.num_images": 2, "nll.batch_size": 2}}
EXPERIMENT_CELLS = {"gpu": [("ddim", 10), ("ddpm", 10), ("dpmpp", 20), ("ddpm", 50)], "ci": [("ddim", 2), ("ddpm", 2)]}
DDP_STEPS = {"gpu": 300, "ci": 4}
OPTIONAL = {"experiment": ("pydantic", "typer", "yaml"), "fid": ("torch_fidelity",), "peer": ("diffusers",)}


# --------------------------------------------------------------------------- running parts
def run_part(cmd: list[str], cwd: Path, log: Path, timeout: float, env: dict) -> dict:
    """Run ``cmd`` in its own process group (killed whole at the timeout), its output appended to ``log``."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {timeout:.0f} s"
    return {"status": status, "seconds": round(time.perf_counter() - start, 1)}


def child_env(cache: Path, pythonpath: Path = REPO, **extra) -> dict:
    path = os.pathsep.join(p for p in (str(pythonpath), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache),
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "DVC_NO_ANALYTICS": "1", **extra}


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def block(path: Path, key: str) -> dict:
    """The ``key`` block of a stage's metrics file (``{"nll": {...}}``); {} when absent."""
    return (read(path) or {}).get(key) or {}


# --------------------------------------------------------------------------- the experiment
def set_dotted(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def experiment_commands(cells: list[tuple[str, int]], device: str) -> list[tuple[str, list[str]]]:
    """The stage commands of dvc.yaml that the experiment runs, in order (no check, report or log)."""
    py = [sys.executable, "-m", "pipeline"]
    dev = ["--device", device]
    cmds = [("prepare", [*py, "prepare", "--out", "data/prepared"]),
            ("classifier", [*py, "classifier", "--data", "data/prepared", "--out", "models/classifier.pt",
                            "--metrics", "metrics/classifier.json", "--timing", "logs/classifier_timing.json", *dev]),
            ("train", [*py, "train", "--data", "data/prepared/train.pt", "--out", "models/model.pt",
                       "--metrics", "metrics/train.json", "--plot", "plots/train_loss.csv",
                       "--timing", "logs/train_timing.json", "--no-live", *dev]),
            ("ema", [*py, "ema", "--checkpoint", "models/model.pt", "--snapshots", "models/ema_snapshots",
                     "--out", "models/model_ema.pt", "--metrics", "metrics/ema.json"])]
    cmds += [(f"sample {s}-{k}", [*py, "sample", "--checkpoint", "models/model_ema.pt", "--sampler", s,
                                  "--steps", str(k), "--out", f"samples/{s}-{k}", *dev]) for s, k in cells]
    cmds += [("fid_ref", [*py, "fid-ref", "--reference", "data/prepared/test.pt", "--classifier",
                          "models/classifier.pt", "--out", "data/reference", *dev])]
    cmds += [(f"fid {s}-{k}", [*py, "fid", "--samples", f"samples/{s}-{k}/samples.pt", "--reference",
                               "data/reference/stats.pt", "--classifier", "models/classifier.pt",
                               "--out", f"metrics/cells/{s}-{k}.json", *dev]) for s, k in cells]
    cmds += [("nll", [*py, "nll", "--checkpoint", "models/model_ema.pt", "--data", "data/prepared/test.pt",
                      "--metrics", "metrics/nll.json", "--plot", "plots/nll_terms.csv", *dev])]
    return cmds


def experiment_part(size: str, overrides: dict, device: str, work: Path, log: Path, cache: Path,
                    deadline: float, limit: float) -> dict:
    import yaml

    ws = work / "experiment"
    shutil.rmtree(ws, ignore_errors=True)
    for folder in ("ddpm", "pipeline"):
        shutil.copytree(REPO / folder, ws / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**EXPERIMENT[size], **overrides}.items():
        set_dotted(params, key, value)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cells = EXPERIMENT_CELLS[size]
    env = child_env(cache, ws, **({"OMP_NUM_THREADS": "1"} if size == "ci" else {}))
    stop = min(deadline, time.monotonic() + limit)
    stages, fid_ok = {}, not missing(*OPTIONAL["fid"])
    for name, cmd in experiment_commands(cells, device):
        if name.startswith("fid") and not fid_ok:
            stages[name] = {"status": "skipped: torch-fidelity is not installed"}
            continue
        left = stop - time.monotonic()
        if left < 2:
            stages[name] = {"status": "skipped: out of time"}
            continue
        stages[name] = run_part(cmd, ws, log, left, env)
        if name in ("prepare", "train", "ema") and stages[name]["status"] != "ok":
            break  # nothing after them can run
    result = {"stages": stages, "params": {k: params[k] for k in ("train", "sample")}, "cells": {},
              "train": {**(read(ws / "logs/train_timing.json") or {}), **block(ws / "metrics/train.json", "train")},
              "classifier": block(ws / "metrics/classifier.json", "classifier"),
              "nll": block(ws / "metrics/nll.json", "nll")}
    for s, k in cells:
        info, m = read(ws / f"samples/{s}-{k}/info.json") or {}, read(ws / f"metrics/cells/{s}-{k}.json") or {}
        result["cells"][f"{s}-{k}"] = {key: info.get(key) for key in ("num_samples", "seconds", "images_per_second",
                                                                       "path")} | {
            key: m.get(key) for key in ("fid", "kid_mean", "precision", "recall")}
    result["grids"] = [str(p) for p in sorted(ws.glob("samples/*/grid.png"))]
    return result


def combine_grids(paths: list[str], out: Path) -> bool:
    """The cells' grids side by side in one PNG, each under its cell's name."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return False
    images = [Image.open(p).convert("L") for p in paths]
    if not images:
        return False
    w, h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("L", (len(images) * (w + 8), h + 16), 255)
    draw = ImageDraw.Draw(sheet)
    for k, (p, im) in enumerate(zip(paths, images)):
        sheet.paste(im, (k * (w + 8), 16))
        draw.text((k * (w + 8) + 2, 2), Path(p).parent.name, fill=0)
    sheet.save(out)
    return True


def ddp_part(processes: int, device: str, size: str, work: Path, log: Path, cache: Path, deadline: float,
             limit: float) -> dict:
    """One process, then ``processes`` under torchrun, training the experiment's model for a few steps."""
    import yaml

    ws = work / "experiment"
    if not (ws / "data/prepared/train.pt").is_file():
        return {"status": "skipped: the experiment part did not prepare the data"}
    params = yaml.safe_load((ws / "params.yaml").read_text())
    set_dotted(params, "train.steps", DDP_STEPS[size])
    set_dotted(params, "train.checkpoint_every", 0)
    (ws / "ddp").mkdir(exist_ok=True)
    (ws / "ddp/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs = {}
    for n in (1, processes):
        d = f"ddp/{n}"
        args = ["--params", "ddp/params.yaml", "--data", "data/prepared/train.pt", "--out", f"{d}/model.pt",
                "--metrics", f"{d}/train.json", "--plot", f"{d}/loss.csv", "--timing", f"{d}/timing.json",
                "--state", f"{d}/state.pt", "--system-metrics", f"{d}/system.json", "--resume", "never",
                "--snapshots", f"{d}/snapshots", "--samples", f"{d}/samples", "--mlflow-run", f"{d}/mlflow.json",
                "--no-live", "--device", device]
        launcher = [sys.executable, "-m", "pipeline"] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "pipeline"]
        left = min(limit, deadline - time.monotonic())
        runs[n] = {"run": run_part([*launcher, "train", *args], ws, log, left, child_env(cache, ws, OMP_NUM_THREADS="1")),
                   "timing": read(ws / d / "timing.json")}
    one, many = (runs[k]["timing"] or {} for k in (1, processes))
    speedup = (many["images_per_second"] / one["images_per_second"]
               if one.get("images_per_second") and many.get("images_per_second") else None)
    return {"processes": processes, "steps": DDP_STEPS[size], "runs": runs, "speedup": speedup}


# --------------------------------------------------------------------------- the projection
DEFAULT_REPRO = {"train_steps": 20000, "batch_size": 128, "num_samples": 5000,
                 "cells": [(s, k) for s in ("ddpm", "ddim", "dpmpp", "euler", "heun") for k in (10, 50, 100, 1000)],
                 "nll_evaluations": 1000 * 1000}


def project(report: dict) -> dict | None:
    """The default ``dvc repro``'s wall time on this GPU, from the measured rates: training and every
    sample cell on the path that is fastest for its amount of work, compile included (what ``auto``
    picks: ``ddpm.acceleration.compile_pays``), plus each stage process's fixed cost as the experiment
    measured it (start-up, loading, the first call); a fid process per cell; nll's evaluations; the
    other stages as measured. An estimate, given with its terms."""
    train, sample, exp = report.get("train") or {}, report.get("sample") or {}, report.get("experiment") or {}
    train_paths = [(v["images_per_second"], v.get("compile_seconds", 0)) for k, v in train.items()
                   if k.startswith("train.") and isinstance(v, dict) and "images_per_second" in v]
    infer_paths = [(v["image_steps_per_second"], v.get("compile_seconds", 0)) for k, v in sample.items()
                   if k.startswith("sample.") and k != "sample.autocast" and isinstance(v, dict)
                   and "image_steps_per_second" in v]
    if not train_paths or not infer_paths:
        return None
    best = lambda paths, work: min(work / rate + start for rate, start in paths)  # noqa: E731
    stages = {k: v.get("seconds") for k, v in (exp.get("stages") or {}).items() if v.get("status") == "ok"}
    cells = exp.get("cells") or {}
    sample_fixed = [stages[k] - (cells.get(k.split(" ", 1)[1]) or {}).get("seconds", 0) for k in stages
                    if k.startswith("sample ")]  # a sample process's cost beyond its sampling
    r = DEFAULT_REPRO
    evaluations = {f"{s}-{k}": r["num_samples"] * k * (2 if s == "heun" else 1) for s, k in r["cells"]}
    fixed = min(sample_fixed) if sample_fixed else 10.0
    nll = exp.get("nll") or {}
    terms = {
        "train": best(train_paths, r["train_steps"] * r["batch_size"]),
        "train process (start, data, outputs)": max(0.0, stages.get("train", 0) - (exp.get("train") or {}).get("seconds", 0))
        if "train" in stages else 15.0,
        "sample (20 cells)": sum(best(infer_paths, n) for n in evaluations.values()) + len(evaluations) * fixed,
        "fid (20 cells)": len(evaluations) * min([v for k, v in stages.items() if k.startswith("fid ")] or [10.0]),
        "nll": best(infer_paths, r["nll_evaluations"]) + (stages["nll"] - nll.get("seconds", 0) if "nll" in stages else 10.0),
        "prepare, classifier, ema, fid_ref": sum(stages.get(k, 10.0) for k in ("prepare", "classifier", "ema", "fid_ref")),
        "check, fid_floor, denoise, report, log (5 processes, est. 8 s each)": 5 * 8.0,
    }
    return {"seconds": round(sum(terms.values()), 1), "terms": {k: round(v, 1) for k, v in terms.items()},
            "assumes": {"train_paths": train_paths, "inference_paths": infer_paths, "sample_process_fixed_seconds": fixed,
                        "network_evaluations": sum(evaluations.values())}}


# --------------------------------------------------------------------------- report
def _f(v, spec="{:,.0f}") -> str:
    return "—" if v is None else spec.format(v)


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def table(report: dict) -> str:
    """The one table (markdown) of the check's figures, then the experiment's cells."""
    env, train, sample = report["environment"], report.get("train") or {}, report.get("sample") or {}
    peer, exp = report.get("peer") or {}, report.get("experiment") or {}
    rows = [f"# gpu-check: {env['device_name']}, torch {env['torch']} (CUDA {env['cuda']}), {env['started']}",
            "", f"{report.get('seconds', '…')} s in all; notes: {'; '.join(report['notes']) or 'none'}", "",
            "| measurement | path | figure | MFU | note |", "|---|---|---|---|---|"]
    for mode in ("none", "cudagraphs", "default", "reduce-overhead", "step-graph"):
        v = train.get(f"train.{mode}")
        if isinstance(v, dict):
            rows.append(f"| train, default config, batch {_get(train, 'model', 'batch_size')} | {mode} | "
                        + (f"{_f(v.get('images_per_second'))} img/s, compile {_f(v.get('compile_seconds'), '{:.1f}')} s"
                           if "error" not in v else f"error: {v['error'][:80]}")
                        + f" | {_f(v.get('mfu'), '{:.1%}')} | {v.get('path', '')} |")
    for mode in ("none", train.get("train.best")):
        p = train.get(f"profile.{mode}")
        if isinstance(p, dict) and "host_ms_per_step" in p:
            rows.append(f"| train step, torch.profiler | {mode} | host {p['host_ms_per_step']:.1f} ms / GPU "
                        f"{p['gpu_ms_per_step']:.1f} ms per step, {p['launches_per_step']:.0f} launches | | |")
    ema = train.get("ema_update")
    if isinstance(ema, dict) and "averages_ms" in ema:
        rows.append(f"| EMA + 2 profiles per step | | 3 × AveragedModel {ema['averaged_model_x3_ms']:.2f} ms, "
                    f"Averages {ema['averages_ms']:.2f} ms | | |")
    for mode in ("autocast", "none", "cudagraphs", "reduce-overhead"):
        v = sample.get(f"sample.{mode}")
        if isinstance(v, dict):
            rows.append(f"| sample ddim-{_get(sample, 'model', 'steps')}, batch {_get(sample, 'model', 'batch_size')} "
                        f"| {mode} | " + (f"{_f(v.get('image_steps_per_second'))} image-steps/s, first call "
                                          f"{_f(v.get('first_call_seconds'), '{:.1f}')} s" if "error" not in v
                                          else f"error: {v['error'][:80]}")
                        + f" | {_f(v.get('mfu'), '{:.1%}')} | {v.get('path', '')} |")
    warm = report.get("warm") or {}
    for key, label in (("warm.train", "first 3 train steps"), ("warm.sample", "first sample call")):
        v = warm.get(key)
        if isinstance(v, dict):
            figure = v.get("first_3_steps_seconds", v.get("first_call_seconds"))
            rows.append(f"| {label}, fresh process, inductor cache warm | {v.get('path', '')} | "
                        f"{_f(figure, '{:.1f}')} s | | {v.get('error', '')[:80]} |")
    for kind, unit in (("train", "images_per_second"), ("sample", "image_steps_per_second")):
        results = {k.split(".", 2)[2]: v for k, v in peer.items() if k.startswith(f"peer.{kind}.") and isinstance(v, dict)}
        for key, v in sorted(results.items()):
            rows.append(f"| bench {kind}, {key.split('.')[0]} | {key.split('.', 1)[1]} | "
                        + (f"{_f(v.get(unit))} {'img/s' if kind == 'train' else 'image-steps/s'}" if "error" not in v
                           else f"error: {v['error'][:80]}") + " | | |")
        for label, ratio in (report.get("ratios") or {}).get(kind, {}).items():
            rows.append(f"| ours / diffusers, {kind} | {label} | {ratio:.2f}× | | |")
    proj = report.get("projection")
    if proj:
        rows.append(f"| projected default `dvc repro` (estimate) | fastest paths | {proj['seconds'] / 60:.1f} min | | "
                    + "; ".join(f"{k} {v:.0f} s" for k, v in proj["terms"].items()) + " |")
    if exp.get("stages"):
        rows += ["", f"## experiment: the stage commands on the real data ({_get(exp, 'params', 'train', 'steps')} "
                     f"training steps, fast path auto)", "",
                 "| stage | status | seconds |", "|---|---|---|"]
        rows += [f"| {k} | {v.get('status')} | {_f(v.get('seconds'), '{:.1f}')} |" for k, v in exp["stages"].items()]
        t = exp.get("train") or {}
        rows += ["", f"train: {_f(t.get('images_per_second'))} img/s over {t.get('steps', '—')} steps, "
                     f"final loss {_f(t.get('final_loss'), '{:.4f}')}, path {t.get('path', '—')}; classifier "
                     f"accuracy {_f(_get(exp, 'classifier', 'test_accuracy'), '{:.3f}')}; bits/dim "
                     f"{_f(_get(exp, 'nll', 'bits_per_dim'), '{:.3f}')} ({_get(exp, 'nll', 'test_images')} images)", "",
                 "| cell | samples | seconds | img/s | FID | precision | recall | path |", "|---|---|---|---|---|---|---|---|"]
        rows += [f"| {c} | {v.get('num_samples')} | {_f(v.get('seconds'), '{:.2f}')} | {_f(v.get('images_per_second'))} | "
                 f"{_f(v.get('fid'), '{:.2f}')} | {_f(v.get('precision'), '{:.3f}')} | {_f(v.get('recall'), '{:.3f}')} | "
                 f"{v.get('path')} |" for c, v in exp.get("cells", {}).items()]
    d = report.get("ddp")
    if d and "runs" in d:
        rows += ["", f"DDP: {d['processes']} processes, speed-up {_f(d.get('speedup'), '{:.2f}')}× ({d['steps']} steps)"]
    return "\n".join(rows) + "\n"


def ratios(peer: dict) -> dict:
    """ours / diffusers per kind: eager (mode none) and each on its best measured path."""
    out = {}
    for kind, unit in (("train", "images_per_second"), ("sample", "image_steps_per_second")):
        got = {tuple(k.split(".")[2:4]): v[unit] for k, v in peer.items()
               if k.startswith(f"peer.{kind}.") and isinstance(v, dict) and unit in v}
        mine = {}
        eager = "none" if kind == "train" else "cudagraphs"
        if ("ours", eager) in got and ("peer", eager) in got:
            mine[f"{eager} vs {eager}"] = got[("ours", eager)] / got[("peer", eager)]
        best = {name: max(((v, mode) for (n, mode), v in got.items() if n == name), default=None)
                for name in ("ours", "peer")}
        if best["ours"] and best["peer"]:
            mine[f"best ({best['ours'][1]}) vs best ({best['peer'][1]})"] = best["ours"][0] / best["peer"][0]
        out[kind] = mine
    return out


def environment(device: str) -> dict:
    import torch

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return {"device": str(dev), "device_name": name, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": list(os.getloadavg()),
            "missing": {part: missing(*mods) for part, mods in OPTIONAL.items()}}


def main(out: Path, size: str = "auto", device: str = "auto", sets: list[str] = (), ddp_processes: int | None = None,
         budget: float | None = None, data: str | None = None, parts: list[str] | None = None) -> dict:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = ("gpu" if torch.device(device).type == "cuda" else "ci") if size == "auto" else size
    if ddp_processes is None:
        ddp_processes = torch.cuda.device_count() if device.startswith("cuda") and torch.cuda.device_count() > 1 else 0
    overrides = {}
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or not key:
            raise SystemExit(f"gpu-check: --set takes key=value, got {s!r}")
        import yaml

        overrides[key] = yaml.safe_load(value)
    if data:
        overrides.update({"data.root": data, "data.download": False})
    parts = parts or ["train", "sample", "warm", "experiment", "peer", "ddp"]
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = work / "inductor-cache"  # cold for the first part: the compile a first user pays
    log = out / "gpu_check.log"
    log.write_text("")
    start = time.monotonic()
    deadline = start + (budget or BUDGET[size])
    report = {"size": size, "environment": environment(device), "notes": []}

    def note(name: str, part) -> None:
        report[name] = part
        report["seconds"] = round(time.monotonic() - start, 1)
        report["ratios"] = ratios(report.get("peer") or {})
        report["projection"] = project(report)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_check.md").write_text(table(report))
        print(f"gpu-check: {name} done after {report['seconds']} s", flush=True)

    for part in ("train", "sample", "warm", "experiment", "peer", "ddp"):
        if part not in parts:
            continue
        if part == "experiment":
            run_experiment(report, size, overrides, device, work, log, cache, deadline, out, note)
        elif part == "ddp" and not ddp_processes:
            report["notes"].append(f"ddp skipped: {torch.cuda.device_count()} GPU(s)")
        elif part == "ddp":
            note("ddp", ddp_part(ddp_processes, device, size, work, log, cache, deadline, LIMITS[size]["ddp"]))
        elif part == "peer" and missing(*OPTIONAL["peer"]):
            report["notes"].append("peer skipped: diffusers is not installed")
        elif min(LIMITS[size][part], deadline - time.monotonic()) < 5:
            report["notes"].append(f"{part} skipped: out of time")
        else:
            path = work / f"{part}.json"
            run = run_part([sys.executable, "-m", "benchmarks.gpu_parts", part, "--json", str(path), "--size", size,
                            "--device", device], REPO, log, min(LIMITS[size][part], deadline - time.monotonic()),
                           child_env(cache, **({"OMP_NUM_THREADS": "1"} if size == "ci" else {})))
            if run["status"] != "ok":
                report["notes"].append(f"{part} {run['status']}")
            note(part, {**(read(path) or {}), "run": run})
            profiles = sorted(work.glob("train.profile-*.txt"))
            if part == "train" and profiles:
                (out / "profile.txt").write_text("\n\n".join(f"== {p.stem.split('-', 1)[1]}\n{p.read_text()}"
                                                              for p in profiles))
    shutil.rmtree(work, ignore_errors=True)
    print((out / "gpu_check.md").read_text())
    return report


def run_experiment(report, size, overrides, device, work, log, cache, deadline, out, note) -> None:
    gone = missing(*OPTIONAL["experiment"])
    if gone:
        report["notes"].append(f"experiment skipped: {', '.join(gone)} not installed")
        return
    left = min(LIMITS[size]["experiment"], deadline - time.monotonic())
    if left < 10:
        report["notes"].append("experiment skipped: out of time")
        return
    result = experiment_part(size, overrides, device, work, log, cache, deadline, left)
    if combine_grids(result.get("grids", []), out / "grids.png"):
        result["grids_png"] = str(out / "grids.png")
    note("experiment", result)


def cli(argv=None) -> None:
    """``python3 -m benchmarks gpu-check``: argparse only, so that it runs where typer is missing."""
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for the (at most 8) files")
    parser.add_argument("--size", choices=["auto", "gpu", "ci"], default="auto",
                        help="auto: gpu on CUDA, else ci (tiny configs on the CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param of the experiment (YAML value; repeatable)")
    parser.add_argument("--data", help="data.root of the experiment (default: params.yaml's)")
    parser.add_argument("--ddp-processes", type=int, help="processes of the DDP part (default: the GPUs, if > 1)")
    parser.add_argument("--budget", type=float, help="seconds for the whole check (default 470 for gpu)")
    parser.add_argument("--parts", help="comma-separated subset of train,sample,warm,experiment,peer,ddp")
    a = parser.parse_args(argv)
    if a.ddp_processes is not None and (a.ddp_processes == 1 or a.ddp_processes < 0):
        parser.error(f"--ddp-processes must be 0 (skip) or at least 2, got {a.ddp_processes}")
    main(a.out, a.size, a.device, a.sets, a.ddp_processes, a.budget, a.data,
         a.parts.split(",") if a.parts else None)
