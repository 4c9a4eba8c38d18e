"""The pipeline's fixed overhead: what every stage process costs before (and after) its work,
and what DVC adds around the stages. ``python -m benchmarks overhead`` prints it.

It runs the whole pipeline once as ``dvc exp run`` in a copy of the repository (like
``make repro PRESET=cpu``), on the real data set but with next to no work in any stage
(``ZERO_WORK``: a 1-step, 8-channel U-Net with T = 50 (at T = 10 the linear schedule's β reach
0.999 and ᾱ_T 1e-17: every sample NaN), 10-sample cells (the fewest the metrics take) of the CPU
preset's shape: 5 samplers × 2 step counts; one intra-op thread). Every stage command goes through a
``python`` shim on PATH that records its wall and CPU time (its own start-up, a ``python -S``,
is in the figures: a few tens of milliseconds), so

  start-up of a stage  = its wall time here (imports, params, loading data, checkpoints and
                         the classifier, hashing, writing; the work left is milliseconds,
                         except prepare, which reads the data set, and fid_ref, which
                         extracts the features of the test split, as in every run)
  DVC's own share      = the wall time of ``dvc exp run`` minus the stages' wall times
                         (its start-up, hashing of dependencies and outputs, the lock
                         file, the run-cache, the experiment commit)

and it times ``import`` of each stage's module (``-X importtime``-style, in a fresh process).
The fixed overhead of a preset run is the sum of the stages' start-ups plus DVC's share;
divide by the preset's wall time for the fraction (the README's Performance section).
``--work cpu-preset`` runs the CPU preset itself (its ``-S`` values read from the Makefile)
the same way: its wall time, each stage's wall and CPU time, and DVC's share.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ddpm.errors import InputError

# next to no work in every stage; the sample matrix has the CPU preset's shape
ZERO_WORK = {"timesteps": 50, "model.ch": 8, "model.ch_mult": [1, 2], "model.num_res_blocks": 1,
             "model.attn_resolutions": [], "train.steps": 1, "train.batch_size": 2, "train.warmup_steps": 1,
             "train.log_every": 1, "train.checkpoint_every": 0, "classifier.steps": 1, "classifier.batch_size": 2,
             "sample.steps": [2, 3], "sample.num_samples": 10, "sample.batch_size": 10, "fid.kid_subset_size": 4,
             "nll.num_images": 1, "nll.batch_size": 1}

SHIM = """#!{python} -S
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call([{python!r}, *sys.argv[1:]])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open({log!r}, "a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], "wall": time.perf_counter() - start,
                        "cpu": ru.ru_utime + ru.ru_stime}}) + "\\n")
sys.exit(rc)
"""


def child_env(**extra) -> dict:
    """The stage processes' environment: this Python's bin first on PATH, a fixed git identity for the
    copy's commits, DVC's analytics off, no MLflow server (the copy logs to its own mlflow.db)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "overhead", "GIT_AUTHOR_EMAIL": "overhead@localhost",
           "GIT_COMMITTER_NAME": "overhead", "GIT_COMMITTER_EMAIL": "overhead@localhost", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def copy_repository(dest: Path, repo: Path) -> None:
    """``repo``'s tracked (and not ignored) files, without tests, into a fresh git repository."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (repo / f).is_file() and not f.startswith(("tests/", "gpu-check/", "benchmarks/results/")):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, dest / f)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "overhead"]):
        subprocess.run(cmd, cwd=dest, env=child_env(), check=True, capture_output=True)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def import_seconds(module: str, repeats: int, cwd: Path, env: dict) -> tuple[float, float]:
    """Median (wall, CPU) seconds of a fresh ``python -c 'import <module>'``."""
    def run():
        start, cpu = time.perf_counter(), _children_cpu()
        subprocess.run([sys.executable, "-c", f"import {module}"], cwd=cwd, check=True, env=env)
        return time.perf_counter() - start, _children_cpu() - cpu

    runs = [run() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def cpu_preset(repo: Path) -> list[str]:
    """The CPU preset's ``-S`` arguments, read from the Makefile (where they are defined once)."""
    rule = "print-cpu-preset: ; @printf '%s\\n' $(CPU_PRESET)"
    out = subprocess.run(["make", "-s", "--eval", rule, "print-cpu-preset"], cwd=repo, capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def main(out: Path | None, repo: Path, repeats: int, sets: dict, work_kind: str = "zero") -> dict:
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddpm-overhead-{os.getpid()}"
    copy_repository(work, repo)
    shim_dir, log = work / ".shim", work / ".shim" / "commands.log"
    shim_dir.mkdir()
    (shim_dir / "python").write_text(SHIM.format(python=sys.executable, log=str(log)))
    (shim_dir / "python").chmod(0o755)
    # zero work: one intra-op thread (a second only adds its start-up and, on a loaded machine,
    # waits for a core, which is not start-up); the CPU preset runs as `make repro` runs it
    env = child_env(**({"OMP_NUM_THREADS": "1"} if work_kind == "zero" else {}))
    env["PATH"] = f"{shim_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(work)
    if work_kind not in ("zero", "cpu-preset"):
        raise InputError(f"unknown work {work_kind!r}; choose zero or cpu-preset")
    preset = cpu_preset(repo) if work_kind == "cpu-preset" else [
        a for k, v in ZERO_WORK.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    args = preset + [a for k, v in sets.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    load = os.getloadavg()
    start, cpu = time.perf_counter(), _children_cpu()
    r = subprocess.run(["dvc", "exp", "run", *args], cwd=work, env=env, capture_output=True, text=True)
    total, total_cpu = time.perf_counter() - start, _children_cpu() - cpu
    if r.returncode != 0:
        from pipeline.errors import ExternalError

        raise ExternalError(f"dvc exp run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    stages = [json.loads(line) for line in log.read_text().splitlines()]
    stages = [s for s in stages if s["args"][0] == "-m" and s["args"][1].startswith("pipeline.stages.")]
    per_kind: dict[str, list[dict]] = {}
    for s in stages:  # by command: module pipeline.stages.fid_ref is command fid-ref
        per_kind.setdefault(s["args"][1].removeprefix("pipeline.stages.").replace("_", "-"), []).append(s)
    # the import time of each stage command that ran
    imports = {k: import_seconds(f"pipeline.stages.{k.replace('-', '_')}", repeats, work, env)
               for k in per_kind} if repeats else {}
    wall, cpu = sum(s["wall"] for s in stages), sum(s["cpu"] for s in stages)
    result = {
        "repo": str(repo), "work": work_kind, "load_average_at_start": list(load), "load_average_at_end": list(os.getloadavg()),
        "dvc_exp_run": {"wall": round(total, 2), "cpu": round(total_cpu, 2)},
        "stages": {"processes": len(stages), "wall": round(wall, 2), "cpu": round(cpu, 2)},
        "dvc_share": {"wall": round(total - wall, 2), "cpu": round(total_cpu - cpu, 2)},
        "per_stage": {k: {"processes": len(v), "wall": round(statistics.median(s["wall"] for s in v), 2),
                          "cpu": round(statistics.median(s["cpu"] for s in v), 2),
                          **({"import_wall": round(imports[k][0], 2), "import_cpu": round(imports[k][1], 2)} if imports else {})}
                      for k, v in per_kind.items()},
    }
    shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)
    return result
