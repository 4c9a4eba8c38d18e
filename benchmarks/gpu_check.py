"""``make gpu-check``: every GPU figure of this project in one run, meant to finish in under
10 minutes on one H100, and the first thing to run whenever a GPU is at hand.

Three parts, each a subprocess with its own time limit within one overall budget, so a
part that fails or runs long leaves the others' figures (and says what happened):

  bench       ``python -m benchmarks bench`` on ``ddpm-cifar10`` and ``fashion-mnist``: our
              U-Net against diffusers' ``UNet2DModel``, both on the device's fast path
              (``auto``: bf16, channels_last, torch.compile on CUDA): train and sample img/s,
              MFU, peak memory
  experiment  the default experiment (``params.yaml``, precision/memory_format/compile
              ``auto``, i.e. the fast path) for a few thousand training steps, every sampler
              at 50 steps, FID and bits/dim: ``dvc repro report nll`` (every stage but the
              MLflow log) in a copy of the repository's tracked files, so it is what a user runs
  ddp         when there is more than one GPU: ``torchrun --nproc_per_node N -m pipeline
              train`` (NCCL) against one process on the same params, img/s and speed-up

It writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (rewritten after every part)
and keeps the parts' logs and the experiment's copy under ``<out>/``. ``size``: ``gpu`` (the
figures above) or ``ci`` (tiny configs, seconds of work per part on a CPU: what the test
suite runs, so that the script is known to work before a GPU is at hand).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ddpm.errors import InputError

REPO = Path(__file__).resolve().parents[1]

# per size: bench configs and options, experiment overrides (dotted keys), DDP training steps,
# each part's share of the budget (the parts run in this order) and the children's environment
SIZES = {
    "gpu": {
        "bench": {"configs": ["ddpm-cifar10", "fashion-mnist"],
                  "options": ["--samplers", "ddim", "--sample-steps", "10", "--warmup", "3", "--repeats", "3",
                              "--iters", "10"]},
        "experiment": {"train.steps": 3000, "train.checkpoint_every": 1000, "sample.steps": [50],
                       "nll.num_images": 250},
        "ddp_steps": 300,
        "limits": {"bench": 120, "experiment": 270, "ddp": 60},
        "budget": 570,
        "env": {},
    },
    "ci": {
        "bench": {"configs": ["tiny"],
                  "options": ["--samplers", "ddim", "--sample-steps", "2", "--batch-size", "2",
                              "--sample-batch-size", "2", "--warmup", "0", "--repeats", "1", "--iters", "1",
                              "--threads", "1"]},
        "experiment": {"timesteps": 100, "model.ch": 8, "model.ch_mult": [1, 2], "model.num_res_blocks": 1,
                       "model.attn_resolutions": [14], "train.steps": 6, "train.batch_size": 8,
                       "train.warmup_steps": 2, "train.log_every": 2, "classifier.steps": 20,
                       "classifier.batch_size": 32, "classifier.arch": {"width": 8, "feature_dim": 16},
                       "sample.samplers": ["ddim"], "sample.steps": [2], "sample.num_samples": 24,
                       "sample.batch_size": 12, "fid.batch_size": 64, "fid.kid_subset_size": 12,
                       "nll.num_images": 2, "nll.batch_size": 2},
        "ddp_steps": 4,
        "limits": {"bench": 120, "experiment": 240, "ddp": 120},
        "budget": 600,
        "env": {"OMP_NUM_THREADS": "1"},  # tiny tensors: one thread is faster, and kinder to a shared machine
    },
}


# --------------------------------------------------------------------------- running parts
def run_part(cmd: list[str], cwd: Path, log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` (in its own process group, killed whole at the timeout), output to ``log``."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {timeout:.0f} s"
    return {"command": " ".join(cmd), "status": status, "seconds": round(time.perf_counter() - start, 1),
            "log": str(log)}


def child_env(**extra) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "gpu-check",
           "GIT_AUTHOR_EMAIL": "gpu-check@localhost", "GIT_COMMITTER_NAME": "gpu-check",
           "GIT_COMMITTER_EMAIL": "gpu-check@localhost", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy logs to its own mlflow.db
    return env


def set_dotted(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or not key:
            raise InputError(f"--set takes key=value, got {s!r}")
        out[key] = yaml.safe_load(value)
    return out


def read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- the parts
def bench_part(size: dict, device: str, peak_tflops: float | None, out: Path, limit: float, deadline: float) -> dict:
    results = {}
    for config in size["bench"]["configs"]:
        path = out / f"bench-{config}.json"
        path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks", "bench", "--config", config, "--device", device,
               "--out", str(path), *size["bench"]["options"]]
        if peak_tflops is not None:
            cmd += ["--peak-tflops", str(peak_tflops)]
        run = run_part(cmd, REPO, out / f"bench-{config}.log", min(limit, deadline - time.monotonic()),
                       child_env(**size["env"]))
        results[config] = {"run": run, "result": read(path)}
    return results


def copy_repository(dest: Path, repo: Path = REPO) -> None:
    """``repo``'s tracked (and not ignored) files, without tests, into a fresh git repository."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (repo / f).is_file() and not f.startswith(("tests/", "gpu-check/")):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, dest / f)
    env = child_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "gpu-check"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)


def experiment_part(size: dict, overrides: dict, device: str, out: Path, limit: float, deadline: float) -> dict:
    repo = out / "experiment"
    copy_repository(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in {**size["experiment"], **overrides}.items():
        set_dotted(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = run_part(["dvc", "repro", "report", "nll"], repo, out / "experiment.log",  # all but the MLflow log
                   min(limit, deadline - time.monotonic()), child_env(**size["env"]))
    cells = {}
    for info in sorted(repo.glob("samples/*/info.json")):
        cell = read(info) or {}
        metrics = read(repo / "metrics" / "cells" / f"{info.parent.name}.json") or {}
        cells[info.parent.name] = {"images_per_second": cell.get("images_per_second"), "seconds": cell.get("seconds"),
                                   "num_samples": cell.get("num_samples"), "fid": metrics.get("fid"),
                                   "kid_mean": metrics.get("kid_mean")}
    from ddpm.acceleration import resolve

    fast = {stage: vars(resolve(device, *(params[stage][k] for k in ("precision", "memory_format", "compile"))))
            for stage in ("train", "sample")}
    return {"run": run, "params": {k: params[k] for k in ("train", "model", "sample")}, "fast_path": fast,
            "train": {**(read(repo / "logs/train_timing.json") or {}), **(read(repo / "metrics/train.json") or {})},
            "cells": cells, "nll": read(repo / "metrics/nll.json"), "classifier": read(repo / "metrics/classifier.json")}


def ddp_part(size: dict, processes: int, device: str, out: Path, limit: float, deadline: float) -> dict:
    """One process, then ``processes`` under torchrun, training the experiment's model for a few steps."""
    repo = out / "experiment"
    if not (repo / "data/prepared/train.pt").is_file():
        return {"status": "skipped: the experiment part did not prepare the data"}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    set_dotted(params, "train.steps", size["ddp_steps"])
    set_dotted(params, "train.checkpoint_every", 0)
    (repo / "ddp").mkdir(exist_ok=True)
    (repo / "ddp/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs = {}
    for n in (1, processes):
        d = f"ddp/{n}"
        args = ["--params", "ddp/params.yaml", "--data", "data/prepared/train.pt", "--out", f"{d}/model.pt",
                "--metrics", f"{d}/train.json", "--plot", f"{d}/loss.csv", "--timing", f"{d}/timing.json",
                "--state", f"{d}/state.pt", "--system-metrics", f"{d}/system.json", "--resume", "never",
                "--device", device]
        launcher = [sys.executable, "-m", "pipeline"] if n == 1 else [
            str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(n), "-m", "pipeline"]
        run = run_part([*launcher, "train", *args], repo, out / f"ddp-{n}.log", min(limit, deadline - time.monotonic()),
                       child_env(**{"OMP_NUM_THREADS": "1", **size["env"]}))
        runs[n] = {"run": run, "timing": read(repo / d / "timing.json")}
    one, many = (runs[k]["timing"] or {} for k in (1, processes))
    speedup = (many["images_per_second"] / one["images_per_second"]
               if one.get("images_per_second") and many.get("images_per_second") else None)
    return {"processes": processes, "steps": size["ddp_steps"], "runs": runs, "speedup": speedup}


# --------------------------------------------------------------------------- report
def environment(device: str) -> dict:
    import torch

    from benchmarks.bench import _device_name
    from pipeline.common import git_revision, resolve_device

    dev = resolve_device(device)
    return {"device": str(dev), "device_name": _device_name(dev), "gpus": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "git_revision": git_revision(REPO),
            "load_average_at_start": list(os.getloadavg()), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _fmt(v, spec="{:.3g}") -> str:
    return "—" if v is None else spec.format(v)


def _path(p: dict) -> str:
    return f"{p['precision']}, {p['memory_format']}, compile {p['compile']}"


def _mib(v) -> str:
    return "—" if v is None else f"{v / 2**20:.0f} MiB"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu-check: {env['device_name']} ({env['device']}, {env['gpus']} GPU(s)), torch {env['torch']}",
             "", f"git {env['git_revision'][:12]}, {env['started']}, size `{report['size']}`, "
                 f"{report.get('seconds', '…')} s in all; load average at start "
                 f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}", ""]
    lines += ["## bench: ours against diffusers' UNet2DModel", "",
              "| config | measurement | precision | ours img/s | peer img/s | ours/peer | ours MFU | peer MFU | "
              "ours peak mem | peer peak mem |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config, b in report.get("bench", {}).items():
        r = b["result"]
        if r is None:
            lines.append(f"| `{config}` | {b['run']['status']} | | | | | | | | |")
            continue
        ours, peer = r["models"]["ours"], r["models"]["peer"]
        rows = [("train step", "train", ours.get("train"), peer.get("train"))]
        rows += [(f"sample {s}, {r['settings']['sample_steps']} steps", f"sample.{s}", ours["sample"][s],
                  (peer.get("sample") or {}).get(s)) for s in ours.get("sample", {})]
        for label, key, a, p in rows:
            p = p or {}
            lines.append(f"| `{config}` | {label} | {r['settings']['precision']} | {_fmt(a['images_per_second'])} | "
                         f"{_fmt(p.get('images_per_second'))} | {_fmt(r['ratio_ours_over_peer'].get(key), '{:.2f}')} | "
                         f"{_fmt(a['mfu'], '{:.1%}')} | {_fmt(p.get('mfu'), '{:.1%}')} | "
                         f"{_mib(a.get('peak_memory_bytes'))} | {_mib(p.get('peak_memory_bytes'))} |")
        lines.append(f"| `{config}` | train loop (`ddpm.training.train`) | {r['settings']['precision']} | "
                     f"{_fmt(ours['loop']['images_per_second'])} | | | | | | |")
    e = report.get("experiment")
    if e:
        t = e["train"]
        lines += ["", f"## experiment: `dvc repro` of params.yaml with the fast path ({e['run']['status']}, "
                      f"{e['run']['seconds']} s)", "",
                  f"train: {t.get('steps', '—')} steps of batch {e['params']['train']['batch_size']} in "
                  f"{_fmt(t.get('seconds'))} s, {_fmt(t.get('images_per_second'))} img/s, final loss "
                  f"{_fmt(t.get('final_loss'), '{:.4f}')}; fast path (auto) of train: {_path(e['fast_path']['train'])}, "
                  f"of sample: {_path(e['fast_path']['sample'])}; classifier "
                  f"accuracy {_fmt((e['classifier'] or {}).get('test_accuracy'), '{:.3f}')}; bits/dim "
                  f"{_fmt((e['nll'] or {}).get('bits_per_dim'), '{:.3f}')}", "",
                  "| cell | samples | img/s | seconds | FID | KID |", "|---|---|---|---|---|---|"]
        for cell, c in e["cells"].items():
            lines.append(f"| {cell} | {_fmt(c['num_samples'], '{}')} | {_fmt(c['images_per_second'])} | "
                         f"{_fmt(c['seconds'])} | {_fmt(c['fid'], '{:.2f}')} | {_fmt(c['kid_mean'], '{:.4f}')} |")
    d = report.get("ddp")
    if d:
        lines += ["", "## DDP", ""]
        if "runs" not in d:
            lines.append(d["status"])
        else:
            lines += ["| processes | status | img/s |", "|---|---|---|"]
            for n, r in d["runs"].items():
                lines.append(f"| {n} | {r['run']['status']} | {_fmt((r['timing'] or {}).get('images_per_second'))} |")
            lines += ["", f"speed-up {_fmt(d['speedup'], '{:.2f}')}× on {d['processes']} processes "
                          f"({d['steps']} steps)"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    from pipeline.common import write_atomic, write_json

    write_json(out / "gpu_check.json", report)
    write_atomic(out / "gpu_check.md", markdown(report))


def main(out: Path, size: str = "auto", device: str = "auto", sets: list[str] = (), ddp_processes: int | None = None,
         peak_tflops: float | None = None, budget: float | None = None) -> dict:
    import torch

    from pipeline.common import resolve_device

    dev = resolve_device(device)
    size = ("gpu" if dev.type == "cuda" else "ci") if size == "auto" else size
    if size not in SIZES:
        raise InputError(f"unknown size {size!r}; choose auto, gpu or ci")
    overrides = parse_sets(list(sets))
    s = SIZES[size]
    if ddp_processes is None:
        ddp_processes = torch.cuda.device_count() if dev.type == "cuda" and torch.cuda.device_count() > 1 else 0
    if ddp_processes == 1 or ddp_processes < 0:
        raise InputError(f"ddp_processes must be 0 (skip) or at least 2, got {ddp_processes}")
    start, deadline = time.monotonic(), time.monotonic() + (budget or s["budget"])
    out.mkdir(parents=True, exist_ok=True)
    report = {"size": size, "environment": environment(str(dev))}

    def note(name: str, part: dict) -> None:
        report[name] = part
        report["seconds"] = round(time.monotonic() - start, 1)
        write_report(report, out)
        print(f"gpu-check: {name} done after {report['seconds']} s → {out / 'gpu_check.md'}", flush=True)

    note("bench", bench_part(s, str(dev), peak_tflops, out, s["limits"]["bench"], deadline))
    note("experiment", experiment_part(s, overrides, str(dev), out, s["limits"]["experiment"], deadline))
    note("ddp", ddp_part(s, ddp_processes, str(dev), out, s["limits"]["ddp"], deadline) if ddp_processes
         else {"status": f"skipped: {torch.cuda.device_count()} GPU(s)"})
    print((out / "gpu_check.md").read_text())
    return report
