"""Self-describing checkpoints.

A checkpoint is one ``torch.save`` file holding plain data only, so it loads with
``weights_only=True``:

    {"format": FORMAT, "step": int, "config": {...}, "model": state_dict, ...extra}

(a diffusion model adds "ema", the averaged weights, beside "model", the raw weights of
the last step, and "ema_config", which average "ema" is; see ``ddpm.model``).

``config`` holds everything needed to rebuild the network and the diffusion
(``config["unet"]`` is a ``UNetConfig`` as a dict). Files are written to a temporary
name and renamed into place, so a crash never leaves a half-written checkpoint.

An EMA snapshot (post-hoc EMA, ``ddpm.posthoc_ema``) is a file of its own format:

    {"format": SNAPSHOT_FORMAT, "step": int, "config": {...}, "sigma_rels": [σ_rel, ...],
     "weights": [state_dict per σ_rel (float16)]}
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

FORMAT = "ddpm-checkpoint/1"
SNAPSHOT_FORMAT = "ddpm-ema-snapshot/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or not one of ours."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def file_mode() -> int:
    """The mode a new file gets (0o666 less the umask); ``mkstemp`` alone gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, sync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path, *, step: int, config: dict, model: dict, **extra) -> None:
    atomic_save({"format": FORMAT, "step": step, "config": config, "model": model, **extra}, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and check a checkpoint; raises ``CheckpointError`` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, …
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {first_line(e)}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    missing = {"step", "config", "model"} - ckpt.keys()
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    return ckpt


def save_snapshot(path, *, step: int, config: dict, sigma_rels: list[float], weights: list[dict]) -> None:
    """An EMA snapshot: the weights of the power EMAs of ``sigma_rels`` after ``step`` steps."""
    atomic_save({"format": SNAPSHOT_FORMAT, "step": step, "config": config, "sigma_rels": list(sigma_rels),
                 "weights": weights}, path)


def load_snapshot(path) -> dict:
    """Load and check an EMA snapshot; raises ``CheckpointError`` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"EMA snapshot {path} does not exist")
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"EMA snapshot {path} is corrupt or not a torch file: {first_line(e)}") from e
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{path} is not a {SNAPSHOT_FORMAT} file")
    if {"step", "config", "sigma_rels", "weights"} - snap.keys() or len(snap["sigma_rels"]) != len(snap["weights"]):
        raise CheckpointError(f"EMA snapshot {path} is incomplete")
    return snap
