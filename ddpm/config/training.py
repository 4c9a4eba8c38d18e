"""What training is configured by: params.yaml's ``train`` section (``TrainConfig``), the rules
of the weights' average (``ddpm.ema``) and the snapshot schedule of post-hoc EMA
(``ddpm.posthoc_ema``)."""

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Le, Lt

from ddpm.config.fast_path import COMPILE_MODES, MEMORY_FORMATS, PRECISIONS
from ddpm.errors import InputError

MAX_SIGMA_REL = math.sqrt(1 / 12)  # σ_rel of γ = 0, the plain average of all steps; larger needs γ < 0


@dataclass(kw_only=True)
class PowerEMA:
    """EDM2's power-function EMA of relative width ``sigma_rel`` (0.05–0.15 in EDM2's experiments)."""

    kind: Literal["power"] = "power"
    sigma_rel: Annotated[float, Gt(0), Lt(MAX_SIGMA_REL)] = 0.10

    def __post_init__(self):
        check_sigma_rel(self.sigma_rel, "sigma_rel")


@dataclass(kw_only=True)
class WarmupEMA:
    """diffusers' ``EMAModel(use_ema_warmup=True)`` ramp, with its defaults."""

    kind: Literal["warmup"] = "warmup"
    decay: Annotated[float, Ge(0), Le(1)] = 0.9999
    inv_gamma: Annotated[float, Gt(0)] = 1.0
    power: Annotated[float, Gt(0)] = 2 / 3

    def __post_init__(self):
        if not 0.0 <= self.decay <= 1.0:
            raise InputError(f"decay must be in [0, 1], got {self.decay}")
        if self.inv_gamma <= 0 or self.power <= 0:
            raise InputError(f"inv_gamma and power must be > 0, got {self.inv_gamma} and {self.power}")


@dataclass(kw_only=True)
class FixedEMA:
    """A constant decay from the first step (Ho et al. 2020: 0.9999)."""

    kind: Literal["fixed"] = "fixed"
    decay: Annotated[float, Ge(0), Le(1)] = 0.9999

    def __post_init__(self):
        if not 0.0 <= self.decay <= 1.0:
            raise InputError(f"decay must be in [0, 1], got {self.decay}")


EMA_CHOICES = (PowerEMA, WarmupEMA, FixedEMA)
EMAConfig = PowerEMA | WarmupEMA | FixedEMA


def check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> None:
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise InputError(f"{name} must be in (0, {MAX_SIGMA_REL:.4f}) (γ > 0), got {sigma_rel}")


MAX_SNAPSHOTS = 64  # per tracked profile: bounds the disk they take (see ``snapshot_steps``)


def snapshot_steps(steps: int, every: int) -> list[int]:
    """The steps after which the profiles are snapshotted: every ``every`` steps and the last."""
    if every <= 0 or steps <= 0:
        return []
    return sorted(set(range(every, steps + 1, every)) | {steps})


def check_schedule(steps: int, every: int, sigma_rels) -> None:
    """Reject σ_rel outside (0, 0.2887), repeated profiles, and more than ``MAX_SNAPSHOTS`` snapshots."""
    for s in sigma_rels:
        check_sigma_rel(s, "ema_profiles entries")
    if len(set(sigma_rels)) != len(sigma_rels):
        raise InputError(f"ema_profiles must not repeat entries, got {list(sigma_rels)}")
    if every < 0:
        raise InputError(f"ema_snapshot_every must be >= 0 (0: no snapshots), got {every}")
    n = len(snapshot_steps(steps, every))
    if sigma_rels and n > MAX_SNAPSHOTS:
        raise InputError(f"ema_snapshot_every {every} gives {n} snapshots over {steps} steps, more than "
                         f"{MAX_SNAPSHOTS}; raise it to at least {-(-steps // MAX_SNAPSHOTS)}")


@dataclass
class TrainConfig:
    # The bounds are metadata (annotated_types) that the params schema enforces.
    steps: Annotated[int, Ge(1)] = 20000
    batch_size: Annotated[int, Ge(1)] = 128
    lr: Annotated[float, Gt(0)] = 2.0e-4
    warmup_steps: Annotated[int, Ge(0)] = 1000
    weight_decay: Annotated[float, Ge(0)] = 0.0
    grad_clip: Annotated[float, Ge(0)] = 1.0  # max gradient norm; 0 disables
    ema: EMAConfig = field(default_factory=PowerEMA)  # the average that sampling uses (ddpm.ema)
    # σ_rel of the post-hoc power EMAs
    ema_profiles: list[Annotated[float, Gt(0), Lt(MAX_SIGMA_REL)]] = field(default_factory=lambda: [0.05, 0.10])
    ema_snapshot_every: Annotated[int, Ge(0)] = 1000  # profiles snapshotted every N steps and after the last; 0 never
    log_every: Annotated[int, Ge(1)] = 100
    checkpoint_every: Annotated[int, Ge(0)] = 1000  # resumable training state saved every N steps; 0 never
    augment: Literal["none", "hflip"] = "none"
    precision: Literal[PRECISIONS] = "auto"  # type: ignore[valid-type]  # auto: bf16 on CUDA, fp32 on CPU; tf32: CUDA only
    memory_format: Literal[MEMORY_FORMATS] = "auto"  # type: ignore[valid-type]  # auto: channels_last on CUDA
    compile: Literal[COMPILE_MODES] = "auto"  # type: ignore[valid-type]  # auto: CUDA graphs (compiled where it pays) on CUDA, none on CPU

    def __post_init__(self):
        check_schedule(self.steps, self.ema_snapshot_every, self.ema_profiles)

    @property
    def snapshot_steps(self) -> list[int]:
        """The steps after which the profiles are snapshotted (none without profiles)."""
        return snapshot_steps(self.steps, self.ema_snapshot_every) if self.ema_profiles else []


