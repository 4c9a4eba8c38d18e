"""The model registry: the EMA model the `log` stage logs in train's run, registered as a new version
of the model (one per pipeline run), described, tagged with what makes its FID comparable, and the
alias ``@best`` on the version with the lowest best FID among those scored like it."""

from importlib import metadata
from pathlib import Path

from pipeline.params.schema import Params, to_flat_dict
from pipeline.tracking import client as tracking
from pipeline.tracking.tidy import FINGERPRINT

def train_params(run: dict) -> dict:
    """The params of train's run, as the train stage recorded them (``logs/train_mlflow.json``)."""
    return (run.get("live") or {}).get("params") or {}


BEST = "best"  # the alias of the registered version with the lowest best FID (see best_version)
COMPARABLE = ("data.name", "fid.extractor", "sample.num_samples")  # FIDs to compare must share these


def best_tags(run: dict) -> dict[str, str]:
    """``best.sampler``, ``best.steps``, ``best.fid``: the best cell of metrics/fid.json, as tags."""
    best = (run["fid"] or {}).get("best") or {}
    return {f"best.{k}": str(best[k]) for k in ("sampler", "steps", "fid") if k in best}


def model_tags(model: dict | None) -> dict[str, str]:
    """What a sample run sampled: the registered version of the checkpoint (models/model_ema.pt)."""
    if not model:
        return {}
    tags = {"model.id": model["model_id"]}
    if model["version"] is not None:
        name, version = model["version"].name, model["version"].version
        tags.update({"model.name": name, "model.version": str(version), "model.uri": f"models:/{name}/{version}"})
    return tags

def log_model(mlflow, client, have, run: dict, params: Params, data: dict, fp: str, exp_name: str, revision: str,
              model_name: str | None) -> dict:
    """The EMA model as a pyfunc (pipeline/mlflow_model.py: samples images) with its signature,
    in train's run, registered as a new version of ``model_name`` (one per pipeline run);
    {"model_id": the logged model, "version": the registered ModelVersion or None}. A model an
    earlier, cut-off attempt logged or registered is found, not logged again."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from pipeline.tracking import mlflow_model

    version_tags = {"dvc.exp_name": exp_name, "git.revision": revision, FINGERPRINT: fp}
    registered = client.search_model_versions(f"name = '{model_name}' and tags.`{FINGERPRINT}` = '{fp}'") \
        if model_name else []  # by an attempt that was cut off
    if have.outputs is not None and have.outputs.model_outputs and (registered or not model_name):
        model_id = have.outputs.model_outputs[0].model_id
        return {"model_id": model_id, "version": registered[0] if registered else None}
    _, channels, size, _ = data["shape"]
    kinds = {str: "string", int: "long", float: "double"}
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, size, size))]),
        params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in mlflow_model.DEFAULTS.items()]))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=mlflow_model.__file__, artifacts={"checkpoint": str(run["model"])},
        code_paths=[str(Path(mlflow_model.__file__).parents[2] / "ddpm")], signature=signature,
        pip_requirements=[f"{p}=={metadata.version(p)}" for p in ("mlflow", "torch", "numpy")],
        registered_model_name=None if registered else model_name,
        params=train_params(run),
        tags={**tracking.standard_tags("python -m pipeline log"), **version_tags},  # the UI's "Logged from"
        step=params.train.steps)
    version = registered[0] if registered else None
    if model_name and not registered:
        version = client.get_model_version(model_name, str(info.registered_model_version))
        for key, value in version_tags.items():
            client.set_model_version_tag(model_name, version.version, key, value)
    return {"model_id": info.model_id, "version": version}


def describe_version(client, model: dict, run: dict, params: Params, exp_name: str, revision: str) -> None:
    """The registered version's description (also the logged model's), its tags (best cell, what makes its
    FID comparable) and the alias BEST (``best_version``)."""
    version = model["version"]
    name = version.name
    text = model_description(run, params, exp_name, revision, f"models:/{name}/{version.version}")
    client.update_model_version(name, version.version, description=text)
    client.set_logged_model_tags(model["model_id"], {"mlflow.note.content": text})
    flat = to_flat_dict(params)
    for key, value in {**best_tags(run), **{k: str(flat[k]) for k in COMPARABLE}}.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, BEST, best_version(client.search_model_versions(f"name = '{name}'"),
                                                               {k: str(flat[k]) for k in COMPARABLE}))


def best_version(versions: list, comparable: dict[str, str]) -> str:
    """The version with the lowest ``best.fid`` tag among those whose COMPARABLE tags equal ``comparable``
    (FIDs from another data set, extractor or number of samples are on other scales)."""
    same = [v for v in versions if "best.fid" in v.tags and all(v.tags.get(k) == c for k, c in comparable.items())]
    return str(min(same, key=lambda v: (float(v.tags["best.fid"]), -int(v.version))).version)


def fmt(value, spec: str = "{:.3f}") -> str:
    return "—" if value is None else spec.format(value)


def results(run: dict) -> str:
    """One sentence of the run's results, from its metrics files."""
    best = (run["fid"] or {}).get("best") or {}
    floor = (run.get("floor") or {}).get("floor") or {}
    nll = (run.get("nll") or {}).get("nll") or {}
    den = (run.get("denoise") or {}).get("denoise") or {}
    return (f"best FID {fmt(best.get('fid'), '{:.2f}')} ({best.get('sampler')}, {best.get('steps')} steps; "
            f"real-data floor {fmt(floor.get('fid'), '{:.2f}')}), bits/dim {fmt(nll.get('bits_per_dim'))}, "
            f"held-out ε-MSE {fmt(den.get('ema_mse'), '{:.4f}')} with the EMA weights "
            f"({fmt(den.get('raw_mse'), '{:.4f}')} raw)")


def model_description(run: dict, params: Params, exp_name: str, revision: str, uri: str) -> str:
    """The registered version's description: which weights, trained how and on what, how good, how to use."""
    data = (run["live"] or {}).get("dataset") or {}
    return (f"EMA weights (models/model_ema.pt) of DVC experiment {exp_name} at git revision {revision[:10]}: "
            f"{params.train.steps} steps of batch {params.train.batch_size} on {data.get('name')} "
            f"(sha256 {str(data.get('sha256'))[:12]}…); {results(run)}; FID of "
            f"{params.sample.num_samples} samples with the {params.fid.extractor} extractor against the test split. "
            f"Sample: mlflow.pyfunc.load_model(\"{uri}\").predict(pandas.DataFrame({{\"seed\": range(16)}}), "
            f"params={{\"sampler\": \"ddim\", \"steps\": 50}}) → uint8 images [N, C, H, W].")
