"""params.yaml's ``denoise``: the held-out denoising MSE."""

from pydantic import Field

from pipeline.params.base import Seed, Strict


class DenoiseParams(Strict):
    num_images: int = Field(512, ge=1)  # the first N test images
    timesteps: int = Field(8, ge=1)  # the grid: midpoints of this many equal slices of {0..T-1}
    batch_size: int = Field(256, ge=1)
    seed: Seed = 3  # the fixed noise


FIELDS = {"denoise": (DenoiseParams, Field(default_factory=DenoiseParams))}
