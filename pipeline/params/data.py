"""params.yaml's ``data``: which data set, where, and how its images are sized (``ddpm.datasets``)."""

from typing import Literal

from pydantic import Field, model_validator

from ddpm.config.data import DATASETS
from pipeline.params.base import Strict


class DataParams(Strict):
    name: Literal[DATASETS] = "fashion_mnist"  # type: ignore[valid-type]
    root: str = "/usr/share/datasets/fashion-mnist"
    download: bool = True
    image_size: int = Field(0, ge=0)  # 0 keeps the native size
    channels: Literal[1, 3] = 1  # image folders only
    test_fraction: float = Field(0.1, gt=0, lt=1)  # image folders only
    max_pixels: int | None = Field(None, ge=1)  # image folders only: null = ddpm.config.data.pixel_limit(image_size)

    @model_validator(mode="after")
    def _check(self):
        if self.name == "folder" and not self.image_size:
            raise ValueError("data.image_size: an image folder has no native size; set data.image_size >= 1")
        return self


FIELDS = {"data": (DataParams, Field(default_factory=DataParams))}
