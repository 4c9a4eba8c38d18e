"""Each sampler's options, apart from the samplers themselves (``ddpm/samplers.py``), so that
the params schema can read them without importing the sampling code: editing a sampler then
re-runs only the stages that sample.

A sampler's options are the fields of its options dataclass: ``Literal`` annotations list the
choices, the bounds are metadata (annotated_types) that the params schema enforces. The step
functions take their defaults from these classes.
"""

from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge, Le

from ddpm.errors import InputError


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
