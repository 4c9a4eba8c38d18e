"""params.yaml's ``ema``: which average of the weights the ema stage hands on."""

from pydantic import Field

from ddpm.config.training import MAX_SIGMA_REL
from pipeline.params.base import Strict


class EmaParams(Strict):
    # None: train's own EMA (train.ema) unchanged; a number: post-hoc EMA of that σ_rel from the snapshots
    sigma_rel: float | None = Field(None, gt=0, lt=MAX_SIGMA_REL)


FIELDS = {"ema": (EmaParams, Field(default_factory=EmaParams))}
