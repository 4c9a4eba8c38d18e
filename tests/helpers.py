"""Helpers the tests import by name: the repository root, tiny data sets written in the real
file formats, tiny params, something built once per test run for every xdist worker
(``build_once``), a fresh tiny DVC repository (``new_repository``; ``queue_env`` for the ones
DVC's queue runs), and a reproduced one with a way to copy it (``build_reproduced``,
``copy_repository``). The fixtures that use them are in conftest.py."""

import functools
import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, tensor: torch.Tensor, compress: bool) -> None:
    """Write a uint8 tensor as an IDX file (magic 0x00000800 | ndim, big-endian dims)."""
    header = struct.pack(">I", 0x0800 | tensor.ndim) + b"".join(struct.pack(">I", d) for d in tensor.shape)
    data = header + tensor.contiguous().numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def synthetic_images(n: int, seed: int, size: int = 28, channels: int = 1):
    """Class-dependent images: class k is a bright horizontal bar at row band k, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 40, (n, channels, size, size), generator=g)
    band = size // 10
    for i, k in enumerate(labels.tolist()):
        images[i, :, k * band:(k + 1) * band + 1, 2:size - 2] = 220
    return images.to(torch.uint8), labels.to(torch.uint8)


def make_idx_dir(root: Path, n_train: int = 256, n_test: int = 128, compress: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_images(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte", images[:, 0], compress)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, compress)
    return root


def committed_params_text() -> str:
    """params.yaml as committed (git's HEAD), else the file: the defaults the tests build on. After
    `make repro` the workspace's params.yaml is the CPU preset's (DVC applies the experiment to it),
    and `make test` must pass there too."""
    r = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else (REPO / "params.yaml").read_text()


def tiny_params(data_root: Path) -> dict:
    """A params.yaml that runs the whole pipeline in seconds on synthetic data."""
    p = yaml.safe_load(committed_params_text())
    p["data"].update(root=str(data_root), download=False)
    p["model"].update(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[14], dropout=0.0)
    # no preview grids: at 28×28 the two of a run (step 0 and the last: 2 × 50 network passes of 16 images)
    # cost 4–6 CPU s, most of a tiny train stage; the tests of the previews turn them on (test_cli, test_guidance,
    # test_live, test_reliability)
    p["train"].update(steps=6, batch_size=8, warmup_steps=2, log_every=2, ema_snapshot_every=2, sample_every=0)
    p["classifier"].update(steps=20, batch_size=32, arch={"width": 8, "feature_dim": 16})
    p["sample"].update(steps=[2, 3], num_samples=24, batch_size=12)
    p["fid"].update(batch_size=64, kid_subset_size=12)
    p["nll"].update(num_images=2, batch_size=2)  # the bound costs T network passes per batch
    p["denoise"].update(num_images=32, batch_size=32)
    return p


# ----------------------------------------------------------------------------- built once per test run
def shared_dir(tmp_path_factory) -> Path:
    """The folder every xdist worker of this test run shares: the run's base temporary folder
    (``pytest-N``; a worker's own ``tmp_path_factory`` folder is ``pytest-N/popen-gwK``)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build) -> Path:
    """``shared_dir/name``, made by ``build(path)`` the first time any worker of this test run
    asks for it; the others wait on a lock, then get the same folder. Treat it as read-only
    (copy it to change it): tests on other workers read it at the same time."""
    from filelock import FileLock

    root = shared_dir(tmp_path_factory) / name
    done = root.with_name(f"{name}.done")
    with FileLock(str(root.with_name(f"{name}.lock"))):
        if not done.exists():
            if root.exists():  # an earlier attempt that failed half-way
                shutil.rmtree(root)
            root.mkdir(parents=True)
            build(root)
            done.touch()
    return root


# ----------------------------------------------------------------------------- a reproduced DVC repository
def git_env(system_metrics: bool = True) -> dict:
    """The environment for git, DVC and the stages: this venv first on PATH, a git identity,
    live MLflow logging on, the default tracking URI (the repository's mlflow.db).

    ``system_metrics=False`` turns off the recorder of `train` and `sample` (MLflow's monitors:
    about 2 CPU seconds of each such stage process) for the tests that never read it; the one
    `dvc repro` of ``reproduced`` keeps it on, so the end-to-end path still writes and logs it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "DVC_NO_ANALYTICS": "1", "PIPELINE_LIVE_MLFLOW": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if not system_metrics:
        env["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
    return env


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    """Run ``cmd``; its stdout, or a failed assertion with the end of its output."""
    r = subprocess.run(cmd, cwd=cwd, env=env or git_env(), capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def e2e_params(data_root: Path) -> dict:
    """The end-to-end tests' params: ``tiny_params`` with T = 100 (the nll stage costs T
    network passes per batch) and a 2 × 1 sample matrix (ddpm and ddim at 3 steps)."""
    p = tiny_params(data_root)
    p["timesteps"] = 100
    p["sample"].update(samplers=["ddpm", "ddim"], steps=[3])
    return p


def queue_env() -> dict:
    """``git_env`` for the repositories whose experiments DVC's queue runs (the study's, exp-run's):
    no live MLflow, torch on one thread, no system-metrics recorder, and no PYTHONPATH, so that
    each stage imports the copy's own ddpm and pipeline (its working directory comes first)."""
    env = {**git_env(system_metrics=False), "PIPELINE_LIVE_MLFLOW": "0", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return env


def new_repository(repo: Path, params: dict, env: dict | None = None, files: dict[str, str] | None = None) -> None:
    """``repo``: the repository's files (tracked or not ignored; not tests/) with ``params`` as
    its params.yaml and ``files`` (path → text) added, in a fresh git repository, committed ("tiny")."""
    def listed(*options: str) -> list[str]:
        return subprocess.run(["git", "ls-files", *options], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.split()

    # new source files too, but not what a pipeline run left in this workspace (after `make repro`: its
    # dvc.lock, whose hashes the new repository's cache lacks, and the .gitignore files DVC writes for outputs)
    untracked = [f for f in listed("--others", "--exclude-standard") if Path(f).name not in ("dvc.lock", ".gitignore")]
    for f in [f for f in listed("--cached") if f != "dvc.lock"] + untracked:
        if (REPO / f).is_file() and not f.startswith("tests/"):
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, repo / f)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for f, text in (files or {}).items():
        (repo / f).write_text(text)
    sh(["git", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "tiny"], repo, env)


def build_reproduced(root: Path) -> None:
    """``root/repo``: ``new_repository`` with ``e2e_params`` (synthetic IDX data in ``root/idx``),
    after `dvc repro` and a commit of the result ("baseline"). MLflow (live in train, then the
    log stage) in its mlflow.db."""
    repo = root / "repo"
    new_repository(repo, e2e_params(make_idx_dir(root / "idx")))
    (root / "repro.out").write_text(sh(["dvc", "repro"], repo))
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "baseline"], repo)


MLFLOW_FILES = ("mlflow.db", "mlflow.db-wal", "mlflow.db-shm")


def copy_repository(src: Path, dest: Path) -> Path:
    """A working copy of the repository ``src`` at ``dest``: git, DVC's cache, every output and
    the MLflow database with its artifacts, the database's absolute paths (artifact locations)
    rewritten from ``src`` to ``dest`` so that the copy logs into itself. DVC's temporary
    folder (.dvc/tmp: locks, its index of this path) is not copied."""
    import sqlite3

    def ignore(folder, names):
        return ["tmp"] if Path(folder) == src / ".dvc" else []

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    if (dest / "mlflow.db").is_file():
        with sqlite3.connect(dest / "mlflow.db") as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                    if kind.upper() in ("TEXT", "VARCHAR") or kind.upper().startswith("VARCHAR"):
                        con.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                                    f'WHERE "{column}" LIKE ?', (str(src), str(dest), f"%{src}%"))
        con.close()
    return dest


@functools.cache
def stage_keys() -> dict[str, list[str]]:
    """Each stage's declared params as its module declares them (``KEYS``, or ``STAGE_KEYS[stage]`` for a
    module that runs two stages of dvc.yaml), for the stages that read part of params.yaml (not `check`
    and `log`, which read all of it). Once per test process (test_params_schema asks for each bad value):
    do not change what it returns."""
    import importlib

    from pipeline.experiments import deps

    out = {}
    for stage in deps.stages(REPO):
        module = importlib.import_module(stage.module)
        keys = getattr(module, "STAGE_KEYS", {}).get(stage.name, module.KEYS)
        if keys != ["params.yaml:"]:
            out[stage.name] = keys
    return out
