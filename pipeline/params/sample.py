"""params.yaml's ``sample``: the sample matrix and how every cell samples."""

from typing import Annotated, Literal

from pydantic import Field

from ddpm.config.fast_path import COMPILE_MODES, MEMORY_FORMATS, NETWORK_PRECISIONS
from ddpm.config.sampling import CLIPS, SPACINGS, WEIGHTS
from pipeline.params.base import Seed, Strict


class SampleParams(Strict):
    samplers: list[str] = Field(default_factory=lambda: ["ddpm", "ddim", "dpmpp", "euler", "heun"], min_length=1)
    steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [10, 50, 100, 1000], min_length=1)
    num_samples: int = Field(5000, ge=2)
    batch_size: int = Field(1000, ge=1)
    spacing: Literal[SPACINGS] = "linspace"  # type: ignore[valid-type]
    clip: Literal[CLIPS] = "static"  # type: ignore[valid-type]
    clip_percentile: float = Field(99.5, gt=50, le=100)  # dynamic only
    precision: Literal[NETWORK_PRECISIONS] = "auto"  # type: ignore[valid-type]  # of the U-Net; auto: bf16 on CUDA, fp32 on CPU
    memory_format: Literal[MEMORY_FORMATS] = "auto"  # type: ignore[valid-type]  # auto: channels_last on CUDA
    compile: Literal[COMPILE_MODES] = "auto"  # type: ignore[valid-type]  # auto: CUDA graphs on CUDA (compiled when it pays), none on CPU
    seed: Seed = 1
    weights: Literal[WEIGHTS] = "ema"  # type: ignore[valid-type]  # the checkpoint's average, or its raw weights
    guidance: list[str] = Field(default_factory=list)  # names under `guidance`: one more matrix axis (class models)

    def check_matrix(self) -> "SampleParams":
        if len(set(self.steps)) != len(self.steps) or len(set(self.samplers)) != len(self.samplers):
            raise ValueError("sample.samplers and sample.steps must not repeat entries")
        if len(set(self.guidance)) != len(self.guidance):
            raise ValueError("sample.guidance must not repeat entries")
        return self


def matrix(p) -> None:
    p.sample.check_matrix()


FIELDS = {"sample": (SampleParams, Field(default_factory=SampleParams))}
VALIDATORS = (matrix,)
