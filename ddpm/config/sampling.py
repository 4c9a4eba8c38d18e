"""How to sample: each sampler's options (``ddpm.samplers`` pairs each kind with its step
function), which timesteps a run visits, how x̂_0 is clipped, which weights, and classifier-free
guidance (``ddpm.guidance``).

A sampler's options are the fields of its options dataclass: ``Literal`` annotations list the
choices, the bounds are metadata (annotated_types) that the params schema enforces. The step
functions take their defaults from these classes.
"""

from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge, Le

from ddpm.errors import InputError

SPACINGS = ("linspace", "leading", "trailing", "quadratic")  # which timesteps a run of `steps` visits
CLIPS = ("static", "dynamic", "none")  # x̂_0: clamped to [-1, 1], dynamic thresholding (Imagen), or not
WEIGHTS = ("ema", "raw")  # which weights of a checkpoint: the average, or the last step's


@dataclass(frozen=True)
class NoOptions:
    """A sampler without options."""


@dataclass(frozen=True)
class DDPMOptions:
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small"


@dataclass(frozen=True)
class DDIMOptions:
    eta: Annotated[float, Ge(0), Le(1)] = 0.0
    variance: Literal["eta", "sigma_hat"] = "eta"

    def __post_init__(self):
        if self.variance == "sigma_hat" and self.eta != 0:
            raise InputError("eta applies to variance: eta only (σ̂ has no η); remove eta or set it to 0")


# the sampler kinds (``ddpm.samplers.SAMPLERS`` pairs each with its step function)
SAMPLER_OPTIONS: dict[str, type] = {"ddpm": DDPMOptions, "ddim": DDIMOptions, "dpm_solver++": NoOptions,
                                    "euler": NoOptions, "heun": NoOptions}


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (``ddpm.guidance``): weight ``w`` (0 = none), ``rescale`` φ and the σ
    ``interval`` (σ_lo, σ_hi] outside which a step is not guided."""

    w: float = 0.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def check(self) -> "Guidance":
        if not self.w >= 0:
            raise InputError(f"guidance weight w must be >= 0 (w = 0: no guidance), got {self.w}")
        if not 0 <= self.rescale <= 1:
            raise InputError(f"guidance rescale must be in [0, 1], got {self.rescale}")
        if self.interval is not None:
            lo, hi = self.interval
            if not 0 <= lo < hi:
                raise InputError(f"guidance interval (σ_lo, σ_hi] needs 0 <= σ_lo < σ_hi, got {self.interval}")
        return self

    def active(self, sigma: float) -> bool:
        """Whether a step at noise level σ is guided (w > 0 and σ in the interval)."""
        if self.w == 0:
            return False
        return self.interval is None or self.interval[0] < sigma <= self.interval[1]
