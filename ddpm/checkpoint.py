"""Self-describing checkpoints.

A checkpoint is one ``torch.save`` file holding plain data only, so it loads with
``weights_only=True``:

    {"format": FORMAT, "step": int, "config": {...}, "model": state_dict, ...extra}

(a diffusion model adds "ema", the averaged weights, beside "model", the raw weights of
the last step, and "ema_config", which average "ema" is; see ``ddpm.model``).

``config`` holds everything needed to rebuild the network and the diffusion
(``config["unet"]`` is a ``UNetConfig`` as a dict). Files are written to a temporary
name and renamed into place (``ddpm.files.atomic_save``), so a crash never leaves a half-written
checkpoint.

An EMA snapshot (post-hoc EMA, ``ddpm.posthoc_ema``) is a file of its own format:

    {"format": SNAPSHOT_FORMAT, "step": int, "config": {...}, "sigma_rels": [σ_rel, ...],
     "weights": [state_dict per σ_rel (float16)]}
"""

from pathlib import Path

from ddpm.errors import InputError, NonFiniteError
from ddpm.files import atomic_save, load_torch_file

FORMAT = "ddpm-checkpoint/1"
SNAPSHOT_FORMAT = "ddpm-ema-snapshot/1"


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt, or not one of ours."""


def save_checkpoint(path, *, step: int, config: dict, model: dict, **extra) -> None:
    atomic_save({"format": FORMAT, "step": step, "config": config, "model": model, **extra}, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and check a checkpoint; raises ``CheckpointError`` naming the file on any problem."""
    path = Path(path)
    ckpt = load_torch_file(path, CheckpointError, f"checkpoint {path} does not exist",
                           f"checkpoint {path} is corrupt or not a torch file", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    missing = {"step", "config", "model"} - ckpt.keys()
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    return ckpt


def non_finite(state: dict) -> str | None:
    """The first floating-point tensor of the state dict ``state`` that holds NaN or ±∞, as
    ``name (k of n values NaN)``; None when every one is finite."""
    for name, v in state.items():
        if hasattr(v, "is_floating_point") and v.is_floating_point():
            finite = v.isfinite()
            if not bool(finite.all()):
                kind = "NaN" if bool(v.isnan().any()) else "infinite"
                return f"{name} ({int((~finite).sum())} of {v.numel()} values {kind})"
    return None


def check_finite(state: dict, what: str) -> None:
    """Raise ``NonFiniteError`` naming ``what`` (the file and which weights) and the first bad tensor
    unless every floating-point tensor of ``state`` is finite: weights with NaN or ∞ give black or
    noise images and normal-looking metrics, so they are refused before any use."""
    bad = non_finite(state)
    if bad is not None:
        raise NonFiniteError(f"{what} are not finite: the first bad tensor is {bad}; refusing to use them "
                             "(did the training diverge, or was the file damaged?)")


def save_snapshot(path, *, step: int, config: dict, sigma_rels: list[float], weights: list[dict]) -> None:
    """An EMA snapshot: the weights of the power EMAs of ``sigma_rels`` after ``step`` steps."""
    atomic_save({"format": SNAPSHOT_FORMAT, "step": step, "config": config, "sigma_rels": list(sigma_rels),
                 "weights": weights}, path)


def load_snapshot(path) -> dict:
    """Load and check an EMA snapshot; raises ``CheckpointError`` naming the file on any problem."""
    path = Path(path)
    snap = load_torch_file(path, CheckpointError, f"EMA snapshot {path} does not exist",
                           f"EMA snapshot {path} is corrupt or not a torch file")
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{path} is not a {SNAPSHOT_FORMAT} file")
    if {"step", "config", "sigma_rels", "weights"} - snap.keys() or len(snap["sigma_rels"]) != len(snap["weights"]):
        raise CheckpointError(f"EMA snapshot {path} is incomplete")
    return snap
