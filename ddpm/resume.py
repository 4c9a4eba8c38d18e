"""Resuming a training run: which runs may resume from a saved state, and the EMA snapshots
written while it trained.

A **fingerprint** (``fingerprint``) names everything that determines the trained weights:
the training config (the objective, the network, the optimiser, the averages, …) and the
training images' shape and SHA-256 (``data_identity``; their labels' too when the network is
class-conditional). A resume file (``ddpm.training.train_state_dict`` plus its ``config``)
is resumed only into a run with the same fingerprint (``read_resume_file``): with mode
``auto`` a file from another config is ignored and overwritten, with ``require`` it is an
error, with ``never`` it is not read. A resumed run ends with the weights of an
uninterrupted one.

**Snapshots** of the post-hoc EMA profiles (``ddpm.posthoc_ema``) are written, while training,
to a staging folder beside the resume file (``staging_dir``): they outlive a killed process
as the resume file does. The resume file lists those it covers; ``prepare_staging`` keeps
exactly those when resuming (a snapshot written after the last resume file belongs to steps
that will be trained again) and empties the folder for a fresh run. At the end
``publish_snapshots`` makes them an output folder of their own, with ``index.json``.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.files import atomic_folder, atomic_write, copy_file, tensor_sha256

RESUME_MODES = ("auto", "never", "require")  # what to do with a resume file a previous run left
# the parts of a training state a resume file must hold besides its config (``ddpm.training.train_state_dict``)
STATE_KEYS = ("ema", "optimizer", "scheduler", "generator", "rng", "losses", "pending")


def data_identity(images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """What the training data contributes to the fingerprint: the images' shape and SHA-256 (and the
    labels', when the network sees them)."""
    identity = {"data.shape": list(images.shape), "data.sha256": tensor_sha256(images.contiguous())}
    if labels is not None:
        identity["data.labels_sha256"] = tensor_sha256(labels.long())
    return identity


def fingerprint(config: dict) -> str:
    """16 hex digits of the SHA-256 of ``config`` (plain JSON data, keys sorted)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def read_resume_file(path: Path, config: dict, mode: str = "auto") -> tuple[dict | None, str]:
    """(the training state to resume from, or None; a line saying what happens), for a run whose
    fingerprinted config is ``config``. ``CheckpointError`` names the file when it is truncated,
    foreign, or (mode ``require``) missing or from another config."""
    if mode not in RESUME_MODES:
        raise CheckpointError(f"unknown resume mode {mode!r}; choose one of {', '.join(RESUME_MODES)}")
    if mode == "never":
        return None, f"not resuming (--resume never); {path} is overwritten at the first checkpoint"
    if not path.is_file():
        if mode == "require":
            raise CheckpointError(f"resume file {path} does not exist (--resume require)")
        return None, "starting fresh"
    ckpt = load_checkpoint(path)  # CheckpointError names the file when truncated or foreign
    saved = ckpt["config"].get("training")
    missing = set(STATE_KEYS) - ckpt.keys()
    if not isinstance(saved, dict) or missing:
        raise CheckpointError(f"resume file {path} is not a training state (lacks {sorted(missing) or ['config.training']})")
    if fingerprint(saved) != fingerprint(config):
        differ = sorted(k for k in saved.keys() | config.keys() if saved.get(k) != config.get(k))
        msg = f"resume file {path} is from another config (differs in {', '.join(differ)})"
        if mode == "require":
            raise CheckpointError(msg)
        return None, f"{msg}: starting fresh, it is overwritten at the first checkpoint"
    return ckpt, f"resuming from step {ckpt['step']} of {path}"


# ------------------------------------------------------------------ the EMA snapshots while training
def snapshot_name(step: int) -> str:
    return f"step-{step:07d}.pt"


def staging_dir(state_path: Path) -> Path:
    """Where the EMA snapshots wait while training: beside the resume file."""
    return state_path.with_name(state_path.stem + ".snapshots")


def prepare_staging(staging: Path, ckpt: dict | None, state_path: Path) -> list[int]:
    """The snapshot steps already written: those the resume file lists (checked present), the
    ones written after it deleted; with nothing to resume from, an emptied folder."""
    if ckpt is None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        return []
    listed = [int(k) for k in ckpt.get("ema_snapshots", [])]
    missing = [snapshot_name(k) for k in listed if not (staging / snapshot_name(k)).is_file()]
    if missing:
        raise CheckpointError(f"resume file {state_path} lists EMA snapshots missing from {staging}: "
                              f"{', '.join(missing)}")
    staging.mkdir(parents=True, exist_ok=True)
    for f in staging.iterdir():
        if f.name not in {snapshot_name(k) for k in listed}:  # written after the resume file, or a temporary
            f.unlink()
    return listed


def snapshot_index(staging: Path, steps: list[int], sigma_rels: list[float], fp: str, dtype: torch.dtype) -> dict:
    """``index.json`` of the snapshots of ``steps`` (in ``staging``), of the profiles ``sigma_rels``."""
    return {"steps": steps, "sigma_rels": list(sigma_rels) if steps else [],
            "files": [snapshot_name(k) for k in steps], "dtype": str(dtype).removeprefix("torch."),
            "bytes": sum((staging / snapshot_name(k)).stat().st_size for k in steps), "fingerprint": fp}


def publish_snapshots(staging: Path, steps: list[int], out: Path, index: dict) -> None:
    """Hard-link (or copy) the staged snapshots and ``index.json`` into a new folder, then swap it in for ``out``."""
    with atomic_folder(out) as tmp:
        for k in steps:
            try:
                os.link(staging / snapshot_name(k), tmp / snapshot_name(k))
            except OSError:
                copy_file(staging / snapshot_name(k), tmp / snapshot_name(k))
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        atomic_write(tmp / "index.json", lambda f: f.write(text.encode()))
