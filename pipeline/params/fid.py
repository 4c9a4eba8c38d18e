"""params.yaml's ``fid``: the ruler every FID is measured with, and how the metrics are computed."""

from typing import Literal

from pydantic import Field

from ddpm.config.evaluation import EXTRACTORS
from pipeline.params.base import Strict


class FidParams(Strict):
    extractor: Literal[EXTRACTORS] = "ddpm-classifier"  # type: ignore[valid-type]
    weights_path: str | None = None  # local Inception weights; None downloads them
    ruler: str | None = None  # a pinned ruler's folder (python -m pipeline ruler pin); None: the pipeline's own
    batch_size: int = Field(500, ge=1)
    kid_subset_size: int = Field(1000, ge=2)


FIELDS = {"fid": (FidParams, Field(default_factory=FidParams))}
