"""The whole of params.yaml: every section's schema, and the checks across sections. The `check`
stage validates the file with it before any other stage runs, and so do the commands that queue
experiments (``exp-run``, ``study``) for each set of ``-S`` overrides; a stage validates only its
own sections (``pipeline.params.base.load``)."""

from pathlib import Path
from typing import Any

from ddpm.config.data import native_size
from ddpm.config.evaluation import too_few
from pipeline.params import (classifier, data, denoise, diffusion, ema, fid, guidance, model, nll, sample, samplers,
                             train)
from pipeline.params.base import flatten, read_yaml, schema, validate

SECTIONS = (diffusion, data, model, train, classifier, sample, samplers, guidance, fid, nll, ema, denoise)


def across(p) -> None:
    """What no section can check alone."""
    unknown = [s for s in p.sample.samplers if s not in p.samplers]
    if unknown:
        raise ValueError(f"sample.samplers names {unknown}, not defined under 'samplers' "
                         f"(defined: {', '.join(p.samplers)})")
    bad = [s for s in p.sample.steps if not 1 <= s <= p.timesteps]
    if bad:
        raise ValueError(f"sample.steps {bad} must lie in [1, timesteps={p.timesteps}]")
    if p.ema.sigma_rel is not None and not p.train.snapshot_steps:
        raise ValueError(f"ema.sigma_rel {p.ema.sigma_rel} asks for post-hoc EMA, which needs snapshots: "
                         "set train.ema_profiles (e.g. [0.05, 0.1]) and train.ema_snapshot_every > 0, "
                         "or ema.sigma_rel: null for train's own EMA")
    unknown = [g for g in p.sample.guidance if g not in p.guidance]
    if unknown:
        raise ValueError(f"sample.guidance names {unknown}, not defined under 'guidance' "
                         f"(defined: {', '.join(p.guidance) or 'none'})")
    if p.sample.guidance and p.conditioning != "class":
        raise ValueError(f"sample.guidance {p.sample.guidance} needs conditioning: class (an unconditional "
                         "model has no ε(x, y) to guide with); set conditioning: class, or sample.guidance: []")
    if p.sample.guidance and p.cond_drop == 0:
        raise ValueError("sample.guidance needs cond_drop > 0: with cond_drop 0 the null class is never "
                         "trained, so the unconditional ε(x, ∅) that guidance subtracts is untrained")
    short = too_few(p.sample.num_samples, p.fid.kid_subset_size)
    if short:  # every sample cell, and the real-data floor (as many real images), would measure nothing
        raise ValueError(f"sample.num_samples {p.sample.num_samples} is too few for the metrics of a sample cell "
                         f"and of the real-data floor: {short}; raise sample.num_samples or lower "
                         "fid.kid_subset_size")
    size = native_size(p.data.name, p.data.image_size)
    if size is not None:  # the network fits the images (their native size unless data.image_size resizes them)
        p.model.validate(size)


Params = schema("Params", *SECTIONS, validators=(across,))


def parse_params(raw: Any, source: str = "params") -> Params:
    return validate(raw, Params, source)


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_yaml(path), str(path))


def to_flat_dict(params: Params) -> dict[str, Any]:
    """``{"train.lr": 0.0002, ...}`` for logging."""
    return flatten(params.model_dump(mode="json"))
