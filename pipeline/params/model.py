"""params.yaml's ``model``: the U-Net's size (``ddpm.config.network.UNetConfig``)."""

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ddpm.config.network import UNetConfig
from pipeline.params.base import STRICT


@pydantic_dataclass(config=STRICT)
class ModelParams(UNetConfig):
    """``UNetConfig``, validated strictly."""


FIELDS = {"model": (ModelParams, Field(default_factory=ModelParams))}
