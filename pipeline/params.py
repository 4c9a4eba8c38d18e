"""The schema of params.yaml, its validation, and per-stage views.

``load_params`` validates the whole file before any work: an unknown key, a wrong
type (a boolean where a number belongs included), a value out of its bounds or an invalid
choice raises ``ParamsError`` naming the key (one line per bad key) and, for choices, the
allowed values; so does an empty file (it would silently mean every default). Every number has
explicit bounds (``ge``/``gt``/``lt``/``le``; the library's dataclasses declare theirs as
``annotated_types`` metadata) and must be finite; tests/test_params_schema.py derives
out-of-range, wrong-type and missing values for every field from the schema. ``for_stage`` returns a view of the params restricted to the keys the
stage declares in dvc.yaml (``STAGE_PARAMS``, checked against dvc.yaml by the tests):
reading an undeclared key fails loudly instead of letting the stage go stale.
"""

import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ddpm.acceleration import COMPILE_MODES, MEMORY_FORMATS, NETWORK_PRECISIONS
from ddpm.classifier import EXTRACTORS, ClassifierConfig
from ddpm.data import DATASETS
from ddpm.diffusion import SPACINGS
from ddpm.ema import EMA_CHOICES, MAX_SIGMA_REL, PowerEMA
from ddpm.errors import InputError
from ddpm.model import WEIGHTS
from ddpm.guidance import CONDITIONINGS
from ddpm.objectives import LOSSES, check_objective
from ddpm.predictions import CLIPS, PREDICTIONS
from ddpm.sampler_options import SAMPLER_OPTIONS
from ddpm.schedules import SCHEDULES
from ddpm.timestep_sampling import TIMESTEP_SAMPLINGS
from ddpm.training import TrainConfig
from ddpm.unet import UNetConfig
from ddpm.variance import VARIANCES
from pipeline.common import flatten


class ParamsError(InputError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # also applies to the nested dataclasses


Seed = Annotated[int, Field(ge=0, lt=2**63)]


class DataParams(Strict):
    name: Literal[DATASETS] = "fashion_mnist"  # type: ignore[valid-type]
    root: str = "/usr/share/datasets/fashion-mnist"
    download: bool = True
    image_size: int = Field(0, ge=0)  # 0 keeps the native size
    channels: Literal[1, 3] = 1  # image folders only
    test_fraction: float = Field(0.1, gt=0, lt=1)  # image folders only


class ClassifierParams(Strict):
    arch: ClassifierConfig = Field(default_factory=ClassifierConfig)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1.0e-3, gt=0)
    seed: Seed = 0


@pydantic_dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class TrainParams(TrainConfig):
    """``ddpm.training.TrainConfig``, with ``ema`` a union tagged by ``kind`` (the choices of ``ddpm.ema``)."""

    ema: Annotated[Union[EMA_CHOICES], Field(discriminator="kind")] = field(default_factory=PowerEMA)  # type: ignore
    # what the train stage does beside the library's loop: a preview grid of the EMA model
    # every N steps, written to plots/train_samples/ and logged live to MLflow (0: never)
    sample_every: int = Field(1000, ge=0)


def _sampler_params(kind: str, options: type) -> type[BaseModel]:
    """The params of one sampler of ``ddpm.sampler_options.SAMPLER_OPTIONS``: its ``kind`` and the fields of its
    options dataclass, whose own checks run too."""
    def check(self):
        options(**self.model_dump(exclude={"kind"}))
        return self

    hints = typing.get_type_hints(options, include_extras=True)
    return create_model("".join(c for c in kind.title() if c.isalnum()) + "Sampler", __base__=Strict,
                        __validators__={"check": model_validator(mode="after")(check)}, kind=(Literal[kind], ...),
                        **{f.name: (hints[f.name], f.default) for f in dataclasses.fields(options)})


SAMPLER_PARAMS = {kind: _sampler_params(kind, options) for kind, options in SAMPLER_OPTIONS.items()}
SamplerParams = Annotated[Union[tuple(SAMPLER_PARAMS.values())], Field(discriminator="kind")]  # type: ignore


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


class FidParams(Strict):
    extractor: Literal[EXTRACTORS] = "ddpm-classifier"  # type: ignore[valid-type]
    weights_path: str | None = None  # local Inception weights; None downloads them
    batch_size: int = Field(500, ge=1)
    kid_subset_size: int = Field(1000, ge=2)


class NllParams(Strict):
    num_images: int = Field(1000, ge=1)  # test images (the first N of the split)
    batch_size: int = Field(250, ge=1)
    clip: Literal["static", "none"] = "static"  # x̂0 clamped to [-1, 1] inside the bound, or not
    seed: Seed = 2  # the noise of x_t ~ q(x_t | x_0) at every t
    weights: Literal[WEIGHTS] = "ema"  # type: ignore[valid-type]
    precision: Literal[NETWORK_PRECISIONS] = "auto"  # type: ignore[valid-type]  # of the U-Net; auto: fp32 (the bound)
    memory_format: Literal[MEMORY_FORMATS] = "auto"  # type: ignore[valid-type]  # auto: channels_last on CUDA
    compile: Literal[COMPILE_MODES] = "auto"  # type: ignore[valid-type]  # auto: CUDA graphs on CUDA, none on CPU


class EmaParams(Strict):
    # None: train's own EMA (train.ema) unchanged; a number: post-hoc EMA of that σ_rel from the snapshots
    sigma_rel: float | None = Field(None, gt=0, lt=MAX_SIGMA_REL)


class DenoiseParams(Strict):
    num_images: int = Field(512, ge=1)  # the first N test images
    timesteps: int = Field(8, ge=1)  # the grid: midpoints of this many equal slices of {0..T-1}
    batch_size: int = Field(256, ge=1)
    seed: Seed = 3  # the fixed noise


class Params(Strict):
    seed: Seed = 0
    schedule: Literal[SCHEDULES] = "linear"  # type: ignore[valid-type]
    prediction: Literal[PREDICTIONS] = "eps"  # type: ignore[valid-type]
    timesteps: int = Field(1000, ge=1)
    loss: Literal[LOSSES] = "simple"  # type: ignore[valid-type]
    variance: Literal[VARIANCES] = "fixed_small"  # type: ignore[valid-type]
    timestep_sampling: Literal[TIMESTEP_SAMPLINGS] = "uniform"  # type: ignore[valid-type]
    hybrid_lambda: float = Field(1.0e-3, gt=0)  # λ of loss=hybrid
    conditioning: Literal[CONDITIONINGS] = "none"  # type: ignore[valid-type]
    cond_drop: float = Field(0.1, ge=0, lt=1)  # class only: share of labels replaced by the null class in training
    data: DataParams = Field(default_factory=DataParams)
    model: UNetConfig = Field(default_factory=UNetConfig)
    train: TrainParams = Field(default_factory=TrainParams)
    classifier: ClassifierParams = Field(default_factory=ClassifierParams)
    sample: SampleParams = Field(default_factory=SampleParams)
    samplers: dict[str, SamplerParams] = Field(default_factory=lambda: {
        name: SAMPLER_PARAMS[kind](kind=kind) for name, kind in (("ddpm", "ddpm"), ("ddim", "ddim"),
                                                                  ("dpmpp", "dpm_solver++"), ("euler", "euler"),
                                                                  ("heun", "heun"))})
    guidance: dict[str, GuidanceParams] = Field(default_factory=dict)
    fid: FidParams = Field(default_factory=FidParams)
    nll: NllParams = Field(default_factory=NllParams)
    ema: EmaParams = Field(default_factory=EmaParams)
    denoise: DenoiseParams = Field(default_factory=DenoiseParams)

    @model_validator(mode="after")
    def _check(self):
        try:  # loss × variance × timestep_sampling combinations that would leave something untrained
            check_objective(self.loss, self.variance, self.timestep_sampling)
        except ValueError as e:
            raise ValueError(str(e)) from None
        unknown = [s for s in self.sample.samplers if s not in self.samplers]
        if unknown:
            raise ValueError(f"sample.samplers names {unknown}, not defined under 'samplers' "
                             f"(defined: {', '.join(self.samplers)})")
        bad = [s for s in self.sample.steps if not 1 <= s <= self.timesteps]
        if bad:
            raise ValueError(f"sample.steps {bad} must lie in [1, timesteps={self.timesteps}]")
        if len(set(self.sample.steps)) != len(self.sample.steps) or len(set(self.sample.samplers)) != len(self.sample.samplers):
            raise ValueError("sample.samplers and sample.steps must not repeat entries")
        for name in self.samplers:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"sampler name {name!r} must be letters, digits and '_' (it names files and metrics)")
        if self.ema.sigma_rel is not None and not self.train.snapshot_steps:
            raise ValueError(f"ema.sigma_rel {self.ema.sigma_rel} asks for post-hoc EMA, which needs snapshots: "
                             "set train.ema_profiles (e.g. [0.05, 0.1]) and train.ema_snapshot_every > 0, "
                             "or ema.sigma_rel: null for train's own EMA")
        for name in self.guidance:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"guidance name {name!r} must be letters, digits and '_' (it names files and metrics)")
        unknown = [g for g in self.sample.guidance if g not in self.guidance]
        if unknown:
            raise ValueError(f"sample.guidance names {unknown}, not defined under 'guidance' "
                             f"(defined: {', '.join(self.guidance) or 'none'})")
        if len(set(self.sample.guidance)) != len(self.sample.guidance):
            raise ValueError("sample.guidance must not repeat entries")
        if self.sample.guidance and self.conditioning != "class":
            raise ValueError(f"sample.guidance {self.sample.guidance} needs conditioning: class (an unconditional "
                             "model has no ε(x, y) to guide with); set conditioning: class, or sample.guidance: []")
        if self.sample.guidance and self.cond_drop == 0:
            raise ValueError("sample.guidance needs cond_drop > 0: with cond_drop 0 the null class is never "
                             "trained, so the unconditional ε(x, ∅) that guidance subtracts is untrained")
        if self.data.name == "folder" and not self.data.image_size:
            raise ValueError("data.image_size: an image folder has no native size; set data.image_size >= 1")
        try:  # the network fits the images (their native size unless data.image_size resizes them)
            self.model.validate(self.data.image_size or {"cifar10": 32}.get(self.data.name, 28))
        except ValueError as e:
            raise ValueError(str(e)) from None
        return self


def _key(loc: tuple, raw: Any) -> str:
    """The dotted key of an error's location in the input ``raw``: without pydantic's
    validator steps and without the tag of a discriminated union (``samplers.ddim.eta``,
    not ``samplers.ddim.ddim.eta``)."""
    parts, node = [], raw
    for p in loc:
        if str(p).startswith(("function-", "tagged-union")):
            continue
        if isinstance(node, dict) and p not in node and node.get("kind") == p:
            continue  # the tag: the union's branch chosen by `kind`
        parts.append(str(p))
        node = node[p] if isinstance(node, dict) and p in node else (
            node[p] if isinstance(node, list) and isinstance(p, int) and p < len(node) else None)
    return ".".join(parts)


def _problems(e: ValidationError, raw: Any) -> dict[str, list[str]]:
    """What is wrong, per dotted key (a key can collect several messages, e.g. from a union)."""
    out: dict[str, list[str]] = {}
    for err in e.errors():
        key = _key(err["loc"], raw)
        msg = err["msg"]
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):  # name the tag's key
            key = f"{key}.{str(err['ctx']['discriminator']).strip(chr(39))}"
        if err["type"] == "union_tag_not_found":
            msg = "missing (this key is required)"
        elif err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key"
        elif err["type"] in ("missing", "missing_argument"):
            msg = "missing (this key is required)"
        elif key and not isinstance(err.get("input"), (dict, list)) and len(repr(err.get("input"))) <= 40:
            msg = f"{msg} (got {err['input']!r})"
        out.setdefault(key or "(top level)", [])
        if msg not in out[key or "(top level)"]:
            out[key or "(top level)"].append(msg)
    return out


def _unwrap(tp: Any) -> tuple[list, str | None]:
    """The members of an annotation (those of a union, else itself), without ``Annotated``, and the
    discriminator of a tagged union (``Field(discriminator=...)``) when it has one."""
    discriminator = None
    while typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        discriminator = next((m.discriminator for m in meta if isinstance(getattr(m, "discriminator", None), str)),
                             discriminator)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [_unwrap(m)[0][0] for m in typing.get_args(tp)], discriminator
    return [tp], discriminator


def _fields(tp: Any) -> dict[str, tuple[Any, str | None]] | None:
    """name → (annotation, discriminator) of a params group (a model or a dataclass); None for other types."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {n: (f.annotation, f.discriminator) for n, f in tp.model_fields.items()}
    if hasattr(tp, "__pydantic_fields__"):  # a pydantic dataclass
        return {n: (f.annotation, f.discriminator) for n, f in tp.__pydantic_fields__.items()}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        return {f.name: (hints[f.name], None) for f in dataclasses.fields(tp)}
    return None


def _is_number(tp: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in typing.get_args(tp))
    return tp in (int, float)


def _takes_bool(tp: Any) -> bool:
    return tp in (bool, Any) or (typing.get_origin(tp) is Literal and any(isinstance(v, bool) for v in typing.get_args(tp)))


def booleans_for_numbers(raw: Any, tp: Any = None, key: str = "", discriminator: str | None = None) -> list[str]:
    """The dotted keys where ``raw`` holds a boolean and the schema (``tp``, default ``Params``) a number:
    pydantic would read ``true`` as 1 there (an int, a float, ``Literal[1, 3]``), and a boolean is not
    a number. Walks the input along the schema's groups, named entries, tagged unions and lists."""
    members, tag = _unwrap(Params if tp is None else tp)
    tag = discriminator or tag
    if isinstance(raw, bool):
        return [key] if any(map(_is_number, members)) and not any(map(_takes_bool, members)) else []
    join = (lambda k: f"{key}.{k}") if key else str
    for m in members:
        if isinstance(raw, dict) and (fields := _fields(m)) is not None:
            if tag and tag in fields and raw.get(tag) not in typing.get_args(_unwrap(fields[tag][0])[0][0]):
                continue  # another branch of the tagged union
            return [bad for k, v in raw.items() if k in fields
                    for bad in booleans_for_numbers(v, fields[k][0], join(k), fields[k][1])]
        if isinstance(raw, dict) and typing.get_origin(m) is dict:
            return [bad for k, v in raw.items() for bad in booleans_for_numbers(v, typing.get_args(m)[1], join(k))]
        if isinstance(raw, list) and typing.get_origin(m) in (list, tuple):
            args = typing.get_args(m)
            items = [args[0]] * len(raw) if typing.get_origin(m) is list or args[-1] is Ellipsis else list(args)
            return [bad for i, (v, t) in enumerate(zip(raw, items)) for bad in booleans_for_numbers(v, t, join(i))]
    return []


def _refuse(source: str, problems: list[str]):
    if len(problems) == 1:  # one line
        raise ParamsError(f"invalid params in {source}: {problems[0]}") from None
    raise ParamsError(f"invalid params in {source}:\n" + "\n".join(f"  {p}" for p in problems)) from None


def parse_params(raw: Any, source: str = "params") -> Params:
    if raw is None or raw == {}:  # every default would be the full GPU-sized experiment: never by accident
        raise ParamsError(f"{source} is empty: it holds no params (write them out; params.yaml has them all)")
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of params at the top level")
    booleans = booleans_for_numbers(raw)  # before pydantic, which would read them as 1 and 0
    if booleans:
        _refuse(source, [f"{key}: a boolean is not a number (got {_at(raw, key)!r})" for key in booleans])
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        _refuse(source, [f"{key}: {'; '.join(msgs)}" for key, msgs in _problems(e, raw).items()])


def _at(raw: Any, key: str) -> Any:
    """The value at a dotted key of the input (list items by index)."""
    for part in key.split("."):
        raw = raw[int(part)] if isinstance(raw, list) else raw[part]
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    return parse_params(raw, str(path))


# --------------------------------------------------------------------------- stage views
STAGE_PARAMS: dict[str, list[str]] = {
    "prepare": ["data"],
    "classifier": ["classifier"],
    "train": ["seed", "schedule", "prediction", "timesteps", "loss", "variance", "timestep_sampling",
              "hybrid_lambda", "conditioning", "cond_drop", "model", "train"],
    "sample": ["sample.num_samples", "sample.batch_size", "sample.spacing", "sample.clip", "sample.clip_percentile",
               "sample.precision", "sample.memory_format", "sample.compile", "sample.seed", "sample.weights",
               "samplers.${item.sampler}"],
    "sample_guided": ["sample.num_samples", "sample.batch_size", "sample.spacing", "sample.clip",
                      "sample.clip_percentile", "sample.precision", "sample.memory_format", "sample.compile",
                      "sample.seed", "sample.weights", "samplers.${item.sampler}", "guidance.${item.guidance}"],
    "fid_ref": ["fid.extractor", "fid.weights_path", "fid.batch_size"],
    "fid_floor": ["fid.extractor", "fid.weights_path", "fid.batch_size", "fid.kid_subset_size", "sample.num_samples",
                  "sample.seed"],
    "fid": ["fid"],
    "fid_guided": ["fid"],
    # the matrix, and the params the report's header shows
    "report": ["sample.samplers", "sample.steps", "sample.guidance", "data.name", "seed", "schedule", "prediction",
               "timesteps", "loss", "variance", "conditioning", "model.ch", "model.ch_mult", "model.num_res_blocks",
               "train.steps", "train.batch_size", "train.lr", "sample.num_samples", "sample.spacing", "fid.extractor"],
    "nll": ["nll"],
    "ema": ["ema"],
    "denoise": ["denoise"],
}


class View:
    """Attribute access to ``obj`` limited to ``allowed`` dotted keys (prefixes allowed)."""

    def __init__(self, obj, allowed: list[str], stage: str, prefix: str = ""):
        self._obj, self._allowed, self._stage, self._prefix = obj, allowed, stage, prefix

    def __getattr__(self, name: str):
        key = f"{self._prefix}{name}"
        if key in self._allowed:
            return getattr(self._obj, name) if not isinstance(self._obj, dict) else self._obj[name]
        if any(a.startswith(key + ".") for a in self._allowed):
            value = getattr(self._obj, name) if not isinstance(self._obj, dict) else self._obj[name]
            return View(value, self._allowed, self._stage, key + ".")
        raise AttributeError(f"stage {self._stage!r} reads param {key!r}, which it does not declare "
                             f"(declared: {', '.join(self._allowed)})")

    def __getitem__(self, name: str):
        return self.__getattr__(name)


def for_stage(params: Params, stage: str, **item: str) -> View:
    """The params ``stage`` may read; ``item`` fills ``${item.x}`` of a matrix stage."""
    allowed = []
    for key in STAGE_PARAMS[stage]:
        for k, v in item.items():
            key = key.replace(f"${{item.{k}}}", str(v))
        allowed.append(key)
    return View(params, allowed, stage)


def stage_values(params: Params, stage: str) -> dict[str, Any]:
    """The values of the keys ``stage`` declares (non-matrix stages), e.g. ``{"seed": 0, "train": {...}}``."""
    dumped = params.model_dump(mode="json")
    out = {}
    for key in STAGE_PARAMS[stage]:
        value = dumped
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def to_flat_dict(params: Params) -> dict[str, Any]:
    """``{"train.lr": 0.0002, ...}`` for logging."""
    return flatten(params.model_dump(mode="json"))
