"""params.yaml's ``classifier``: the offline FID's feature extractor, trained on the data set."""

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ddpm.config.evaluation import ClassifierConfig
from pipeline.params.base import STRICT, Seed, Strict


@pydantic_dataclass(config=STRICT)
class ArchParams(ClassifierConfig):
    """``ClassifierConfig``, validated strictly."""


class ClassifierParams(Strict):
    arch: ArchParams = Field(default_factory=ArchParams)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1.0e-3, gt=0)
    seed: Seed = 0


FIELDS = {"classifier": (ClassifierParams, Field(default_factory=ClassifierParams))}
