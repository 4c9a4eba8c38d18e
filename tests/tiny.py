"""Helpers for the reliability tests: a tiny 8×8 prepared data set, params sized to train
in about a second, and ways to run `python -m pipeline` in-process or as a subprocess.
(The tests using it run on one torch thread: conftest's ``one_thread`` fixture.)"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from helpers import REPO, synthetic_images, tiny_params
from typer.testing import CliRunner

from ddpm.data import Split, save_split
from pipeline.cli import app

CLASSES = [str(k) for k in range(10)]


def workspace(root: Path, **train) -> Path:
    """``root`` with data/prepared/{train,test}.pt (8×8 images) and params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 64, 0), ("test", 32, 1)):
        images, labels = synthetic_images(n, seed, size=8)
        save_split(Split(images, labels.long(), CLASSES), root / f"data/prepared/{split}.pt")
    write_params(root, **train)
    return root


def write_params(root: Path, top: dict | None = None, **train) -> Path:
    p = tiny_params(root / "no-idx")
    p["data"]["image_size"] = 8
    p["model"].update(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    p["train"].update(steps=6, batch_size=8, warmup_steps=2, log_every=2, checkpoint_every=2)
    p["train"].update(train)
    p.update(top or {})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def cli(root: Path, *args: str, env: dict | None = None):
    """Run ``python -m pipeline <args>`` in-process with ``root`` as working directory."""
    old = os.getcwd()
    os.chdir(root)
    try:
        return CliRunner().invoke(app, list(args), env=env)
    finally:
        os.chdir(old)


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def run(root: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(python(*args), cwd=root, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, **kwargs)


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def errors(result) -> list[str]:
    """The error lines a command printed (the progress bar also writes to stderr)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error")]

