"""params.yaml's ``guidance``: named classifier-free guidance settings (``ddpm.config.sampling.Guidance``)."""

from typing import Annotated

from pydantic import Field, model_validator

from pipeline.params.base import Strict


class GuidanceParams(Strict):
    """One classifier-free guidance setting (``ddpm.guidance``): ε̃ = (1 + w) ε_c − w ε_u."""

    w: float = Field(gt=0, le=100)  # w = 0 is the unguided cell <sampler>-<steps> itself
    rescale: float = Field(0.0, ge=0, le=1)  # φ of Lin et al. 2024; 0 = off
    # (σ_lo, σ_hi]: guide only there (Kynkäänniemi et al. 2024); null = every step
    interval: tuple[Annotated[float, Field(ge=0, le=1.0e6)], Annotated[float, Field(gt=0, le=1.0e6)]] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.interval is not None and not self.interval[0] < self.interval[1]:
            raise ValueError(f"interval [σ_lo, σ_hi] needs σ_lo < σ_hi, got {list(self.interval)}")
        return self


def names(p) -> None:
    for name in p.guidance:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"guidance name {name!r} must be letters, digits and '_' (it names files and metrics)")


FIELDS = {"guidance": (dict[str, GuidanceParams], Field(default_factory=dict))}
VALIDATORS = (names,)
