"""params.yaml's ``train``: the training loop (``ddpm.config.training.TrainConfig``) and the train
stage's own preview grids."""

from dataclasses import field
from typing import Annotated, Union

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ddpm.config.training import EMA_CHOICES, PowerEMA, TrainConfig
from pipeline.params.base import STRICT


@pydantic_dataclass(config=STRICT)
class TrainParams(TrainConfig):
    """``ddpm.config.training.TrainConfig``, with ``ema`` a union tagged by ``kind``."""

    ema: Annotated[Union[EMA_CHOICES], Field(discriminator="kind")] = field(default_factory=PowerEMA)  # type: ignore
    # what the train stage does beside the library's loop: a preview grid of the EMA model
    # every N steps, written to plots/train_samples/ and logged live to MLflow (0: never)
    sample_every: int = Field(1000, ge=0)


FIELDS = {"train": (TrainParams, Field(default_factory=TrainParams))}
