"""params.yaml's top-level keys: the diffusion model and its objective (``ddpm.config.diffusion``)."""

from typing import Literal

from pydantic import Field

from ddpm.config.diffusion import (CONDITIONINGS, LOSSES, PREDICTIONS, SCHEDULES, TIMESTEP_SAMPLINGS, VARIANCES,
                                   check_objective)
from pipeline.params.base import Seed

FIELDS = {
    "seed": (Seed, 0),
    "schedule": (Literal[SCHEDULES], "linear"),  # type: ignore[valid-type]
    "prediction": (Literal[PREDICTIONS], "eps"),  # type: ignore[valid-type]
    "timesteps": (int, Field(1000, ge=1)),
    "loss": (Literal[LOSSES], "simple"),  # type: ignore[valid-type]
    "variance": (Literal[VARIANCES], "fixed_small"),  # type: ignore[valid-type]
    "timestep_sampling": (Literal[TIMESTEP_SAMPLINGS], "uniform"),  # type: ignore[valid-type]
    "hybrid_lambda": (float, Field(1.0e-3, gt=0)),  # λ of loss=hybrid
    "conditioning": (Literal[CONDITIONINGS], "none"),  # type: ignore[valid-type]
    "cond_drop": (float, Field(0.1, ge=0, lt=1)),  # class only: share of labels replaced by the null class
}


def objective(p) -> None:
    """loss × variance × timestep_sampling combinations that would leave something untrained."""
    check_objective(p.loss, p.variance, p.timestep_sampling)


VALIDATORS = (objective,)
