"""params.yaml's ``nll``: the test NLL in bits/dim from the full bound."""

from typing import Literal

from pydantic import Field

from ddpm.config.fast_path import COMPILE_MODES, MEMORY_FORMATS, NETWORK_PRECISIONS
from ddpm.config.sampling import WEIGHTS
from pipeline.params.base import Seed, Strict


class NllParams(Strict):
    num_images: int = Field(1000, ge=1)  # test images (the first N of the split)
    batch_size: int = Field(250, ge=1)
    clip: Literal["static", "none"] = "static"  # x̂0 clamped to [-1, 1] inside the bound, or not
    seed: Seed = 2  # the noise of x_t ~ q(x_t | x_0) at every t
    weights: Literal[WEIGHTS] = "ema"  # type: ignore[valid-type]
    precision: Literal[NETWORK_PRECISIONS] = "auto"  # type: ignore[valid-type]  # of the U-Net; auto: fp32 (the bound)
    memory_format: Literal[MEMORY_FORMATS] = "auto"  # type: ignore[valid-type]  # auto: channels_last on CUDA
    compile: Literal[COMPILE_MODES] = "auto"  # type: ignore[valid-type]  # auto: CUDA graphs on CUDA, none on CPU


FIELDS = {"nll": (NllParams, Field(default_factory=NllParams))}
