"""params.yaml's ``samplers``: named sampler configurations, each a kind of ``ddpm.samplers`` with
its options (``ddpm.config.sampling.SAMPLER_OPTIONS``)."""

import dataclasses
import typing
from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field, create_model, model_validator

from ddpm.config.sampling import SAMPLER_OPTIONS
from pipeline.params.base import Strict


def _sampler_params(kind: str, options: type) -> type[BaseModel]:
    """The params of one sampler kind: its ``kind`` and the fields of its options dataclass, whose own
    checks run too."""
    def check(self):
        options(**self.model_dump(exclude={"kind"}))
        return self

    hints = typing.get_type_hints(options, include_extras=True)
    return create_model("".join(c for c in kind.title() if c.isalnum()) + "Sampler", __base__=Strict,
                        __validators__={"check": model_validator(mode="after")(check)}, kind=(Literal[kind], ...),
                        **{f.name: (hints[f.name], f.default) for f in dataclasses.fields(options)})


SAMPLER_PARAMS = {kind: _sampler_params(kind, options) for kind, options in SAMPLER_OPTIONS.items()}
SamplerParams = Annotated[Union[tuple(SAMPLER_PARAMS.values())], Field(discriminator="kind")]  # type: ignore
DEFAULT = (("ddpm", "ddpm"), ("ddim", "ddim"), ("dpmpp", "dpm_solver++"), ("euler", "euler"), ("heun", "heun"))


def names(p) -> None:
    for name in p.samplers:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"sampler name {name!r} must be letters, digits and '_' (it names files and metrics)")


FIELDS = {"samplers": (dict[str, SamplerParams],
                       Field(default_factory=lambda: {name: SAMPLER_PARAMS[kind](kind=kind) for name, kind in DEFAULT}))}
VALIDATORS = (names,)
