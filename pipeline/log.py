"""Stage `log`: send one pipeline run to MLflow.

One parent run per pipeline run (named and tagged with the DVC experiment name and
the git revision) holding every param, the summary metrics (the DVC metrics under the names
`dvc exp show` gives them: ``best.fid``, ``fid.<sampler>.<steps>``, ``floor.fid``,
``nll.bits_per_dim``, ``denoise.ema_mse``, …), the best cell as tags (``best.sampler``,
``best.steps``, ``best.fid``), a description saying what ran and what came out, the test
split as its evaluation data set, and the report; child runs for `train` (the loss, learning
rate and gradient-norm histories, the preview grids as the step-indexed image ``samples``,
the training data set, the model; its one-off figures as ``train.*`` tags, not one-point
metrics), `classifier`, and one per sampler × steps (× guidance) cell
(FID/KID/precision/recall/IS, class accuracy, throughput, sample grid and denoising strip,
tagged with the registered model version it sampled). `train` and each cell carry the system
metrics their stage recorded while it worked (``system/...`` histories: CPU, memory, disk,
network, GPU; see pipeline/system_metrics.py). The parent holds the report as the
self-contained HTML (MLflow's markdown viewer shows no images) and the figures under
`reports/`, and the plots (CSV, preview grids) under `plots/`; no dotfiles.

The EMA model is logged in train's run and registered as a new version of the model (one
per pipeline run), with a description, tags (``best.fid`` and what makes FIDs comparable:
data set, extractor, number of samples) and the alias ``@best`` on the version with the
lowest best FID among those scored like the newest one; its FID, bits/dim and denoising MSE
are linked to the logged model with the test split, its final loss with the training split
(the model page's metrics and "Datasets used").

The stage reads only files the other stages wrote, and runs on every `dvc repro` /
`dvc exp run` (always_changed), so experiments restored from the run-cache are
logged too. A fingerprint of params + metrics + experiment + revision is stored as a
tag; a run already logged is not logged twice (the check and the logging hold one file
lock, so parallel stages against a fresh ``mlflow.db`` neither crash nor duplicate).

One pipeline run is one parent run. Every run the stage opens carries the tag
``pipeline.logging = <fingerprint>`` while it is logged; the parent gets
``pipeline.fingerprint`` last, then the first tag is removed from every run of the attempt. A
``log`` killed half-way (``kill -9``, a server that went away) leaves runs with the first tag
and no complete parent: the next ``log`` or ``sync`` of the same pipeline run marks them FAILED
and deletes them (``mlflow gc`` purges them) before it logs the run in full; a complete parent
killed before it was closed is marked FINISHED.

If the tracking server cannot be reached the stage warns and succeeds (the DVC metrics
are already written) after a few seconds (one HTTP retry), and copies what it would
have logged into the outbox ``<repo root>/.mlflow-outbox/<fingerprint>-<uri hash>/``,
with the tracking URI it was meant for. ``python -m pipeline sync`` logs each waiting run
to its own tracking URI (``sync --to URI`` sends them all elsewhere, on purpose); the
`log` stage sends the runs waiting for its URI whenever it reaches it. Nothing is lost,
nothing is logged twice, and nothing goes to a server it was not meant for.
"""

import csv
import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from pipeline import system_metrics, tracking
from pipeline.common import ExternalError, OutputError, experiment_name, flatten, git_revision, repo_root
from pipeline.live import IMAGE_KEY, image_steps
from pipeline.params import Params, load_params, to_flat_dict
from pipeline.tracking import default_tracking_uri, lock


OUTBOX = ".mlflow-outbox"
FINGERPRINT, LOGGING = "pipeline.fingerprint", "pipeline.logging"  # tags: complete run; run being logged
ATTACHED = "pipeline.attached"  # tag of train's own run once a parent holds it (not LOGGING: never deleted by tidy)
# What `collect` reads, relative to the workspace: copied into the outbox when unreachable.
RUN_FILES = ("metrics", "plots", "reports", "logs", "models/model_ema.pt", "data/reference/info.json",
             "samples/*/info.json", "samples/*/grid.png", "samples/*/strip.png", "samples/*/system.json")
HISTORY = ("loss", "lr", "grad_norm")  # train's metric histories (plots/train_loss.csv)
NOT_LOGGED = ("report.md",)  # its images are relative links, which MLflow's markdown viewer does not show
BEST = "best"  # the alias of the registered version with the lowest best FID (see best_version)
COMPARABLE = ("data.name", "fid.extractor", "sample.num_samples")  # FIDs to compare must share these
# the parent's metrics that describe the logged model, and the split each was measured on
MODEL_METRICS = {"train.final_loss": "train", "best.fid": "test", "nll.bits_per_dim": "test",
                 "denoise.ema_mse": "test"}


def outbox() -> Path:
    return repo_root() / OUTBOX


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(params: Params, root: Path = Path(".")) -> dict:
    """Everything this run produced that goes to MLflow, read from the stage outputs under ``root``."""
    cells = {}
    for s in params.sample.samplers:
        for k, g in [(k, g) for k in params.sample.steps for g in [None, *params.sample.guidance]]:
            name = f"{s}-{k}" + (f"-{g}" if g else "")
            cells[name] = {"sampler": s, "steps": k, "guidance": g,
                           "metrics": _read(root / f"metrics/cells/{name}.json"),
                           "info": _read(root / f"samples/{name}/info.json"),
                           "system": system_metrics.read(root / f"samples/{name}/system.json"),
                           "grid": root / f"samples/{name}/grid.png", "strip": root / f"samples/{name}/strip.png"}
    return {"train": _read(root / "metrics/train.json"), "timing": _read(root / "logs/train_timing.json"),
            "classifier": _read(root / "metrics/classifier.json"), "fid": _read(root / "metrics/fid.json"),
            "nll": _read(root / "metrics/nll.json"), "ema": _read(root / "metrics/ema.json"),
            "denoise": _read(root / "metrics/denoise.json"), "floor": _read(root / "metrics/fid_floor.json"),
            "reference": _read(root / "data/reference/info.json"),
            "history": _read_history(root / "plots/train_loss.csv", root / "plots/train_lr.csv"),
            "previews": sorted((int(f.stem.split("_")[-1]), f)
                               for f in (root / "plots/train_samples").glob("step_*.png")),
            "live": _read(root / "logs/train_mlflow.json"),
            "classifier_timing": _read(root / "logs/classifier_timing.json"),
            "pipeline": _read(root / "logs/pipeline_started.json"),
            "model": root / "models/model_ema.pt",  # the weights the sample stages use (ema stage)
            "cells": cells,
            "system": system_metrics.read(root / "logs/train_system.json")}


def _read_history(path: Path, lr_path: Path | None = None) -> list[dict]:
    """train's ``step,loss,lr,grad_norm`` rows (lr and grad_norm None where absent), and the learning rate of
    the warm-up's steps from ``lr_path`` (``step,lr``) as rows with only ``lr``, by step."""
    def value(row: dict, key: str):
        return float(row[key]) if row.get(key) not in (None, "") else None

    rows: dict[int, dict] = {}
    if path.is_file():
        with path.open() as f:
            rows = {int(r["step"]): {"step": int(r["step"]), **{k: value(r, k) for k in HISTORY}}
                    for r in csv.DictReader(f)}
    if lr_path is not None and lr_path.is_file():
        with lr_path.open() as f:
            for r in csv.DictReader(f):
                row = rows.setdefault(int(r["step"]), {"step": int(r["step"]), **dict.fromkeys(HISTORY)})
                row["lr"] = value(r, "lr")
    return [rows[k] for k in sorted(rows)]


def fingerprint(flat_params: dict, run: dict, exp_name: str, revision: str) -> str:
    summary = {"params": flat_params, "exp": exp_name, "rev": revision, "train": run["train"],
               "classifier": run["classifier"], "nll": run.get("nll"), "ema": run.get("ema"),
               "denoise": run.get("denoise"), "floor": run.get("floor"),
               "cells": {k: c["metrics"] for k, c in run["cells"].items()}}
    return hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _numeric(d: dict | None, prefix: str = "") -> dict[str, float]:
    return {k: float(v) for k, v in flatten(d or {}, prefix).items() if isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _log_history(client, run_id: str, metrics: list) -> None:
    """Metric histories (``Metric`` entities with their steps), in batches MLflow accepts."""
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


@contextmanager
def _run(mlflow, client, experiment_id: str, name: str, tags: dict, *, parent: str | None = None,
         times: tuple[int | None, int | None] = (None, None), run_id: str | None = None):
    """The block's active MLflow run: created (under ``parent``), or the existing ``run_id``
    reopened, with the real start and end time of the work it describes (``times``, epoch ms,
    from the stage's own record; unknown ends are the block's)."""
    start, end = times
    if run_id is None:
        run_tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = client.create_run(experiment_id, start_time=start or tracking.now_ms(), tags=run_tags,
                                   run_name=name).info.run_id
    with mlflow.start_run(run_id=run_id, nested=parent is not None) as active:
        yield active
    if end:  # closing the block ended it now; the work ended then
        client.set_terminated(run_id, "FINISHED", end_time=end)


def attachable(client, live: dict | None, uri: str, experiment_id: str, fp: str):
    """train's own MLflow run (``logs/train_mlflow.json``), when this pipeline run may hold it:
    at this tracking URI, in this experiment, and held by no other pipeline run's parent (it
    is, when DVC restored `train` from its run-cache: then a new run is made from the files)."""
    if not live or not live.get("run_id") or not same_uri(live.get("tracking_uri"), uri):
        return None
    try:
        run = client.get_run(live["run_id"])
    except Exception:  # noqa: BLE001 - deleted for good, or another store behind the same URI
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    if parent := run.data.tags.get("mlflow.parentRunId"):
        try:
            holder = client.get_run(parent)
        except Exception:  # noqa: BLE001
            holder = None
        if holder is not None and holder.info.lifecycle_stage == "active" and holder.data.tags.get(LOGGING) != fp:
            return None
    return run


def summary_metrics(run: dict) -> dict[str, float]:
    """The parent's metrics: every number of the DVC metrics files, under the names `dvc exp show` gives
    them (``best.steps`` is a tag: it names the best cell, it measures nothing)."""
    numbers = {}
    for key in ("fid", "floor", "nll", "denoise", "ema", "classifier", "train"):
        numbers.update(_numeric(run.get(key)))
    numbers.pop("best.steps", None)
    return numbers


def best_tags(run: dict) -> dict[str, str]:
    """``best.sampler``, ``best.steps``, ``best.fid``: the best cell of metrics/fid.json, as tags."""
    best = (run["fid"] or {}).get("best") or {}
    return {f"best.{k}": str(best[k]) for k in ("sampler", "steps", "fid") if k in best}


def _log_folder(mlflow, folder: Path, artifact_path: str) -> None:
    """The files under ``folder`` (recursively) as artifacts, but dotfiles (DVC's .gitignore) and NOT_LOGGED."""
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts) and f.name not in NOT_LOGGED:
            mlflow.log_artifact(str(f), str(Path(artifact_path, *rel.parts[:-1]).as_posix()))


def evaluation_dataset(run: dict, params: Params) -> dict | None:
    """The test split FID, bits/dim and the denoising MSE are measured on, described as train describes its
    training split (for ``tracking.training_dataset``): from fid_ref's data/reference/info.json."""
    ref = run.get("reference")
    if not ref or "data_sha256" not in ref:
        return None
    source = Path(ref["source"])
    return {"name": f"{params.data.name}-{ref.get('split', 'test')}", "sha256": ref["data_sha256"],
            "source": str(source if source.is_absolute() else repo_root() / source),
            "shape": [ref["num_images"], *ref["resolution"]]}


def log_run(mlflow, params: Params, params_path: Path, run: dict, exp_name: str, revision: str, fp: str,
            root: Path = Path("."), experiment_id: str | None = None, uri: str | None = None,
            model_name: str | None = None) -> str:
    client = mlflow.MlflowClient()
    flat = to_flat_dict(params)
    tags = {"dvc.exp_name": exp_name, "git.revision": revision, LOGGING: fp}
    std = tracking.standard_tags

    def stage_times(record: dict | None) -> tuple[int | None, int | None]:
        return (record or {}).get("started_ms"), (record or {}).get("ended_ms")

    pipeline_start = (run["pipeline"] or {}).get("started_ms")  # when the check stage ran
    test = evaluation_dataset(run, params)
    with _run(mlflow, client, experiment_id, exp_name, {**std("dvc.yaml"), **tags, **best_tags(run)},
              times=(pipeline_start, None)) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()})
        mlflow.log_artifact(str(params_path))
        for folder in ("reports", "plots"):
            if (root / folder).is_dir():
                _log_folder(mlflow, root / folder, folder)
        if test is not None:
            mlflow.log_input(tracking.training_dataset(mlflow, test), context="evaluation",
                             tags={"sha256": test["sha256"]})

        own = attachable(client, run["live"], uri, experiment_id, fp)
        if own is not None:  # train's live run joins this pipeline run
            client.set_tag(own.info.run_id, "mlflow.parentRunId", parent_id)
            client.set_tag(own.info.run_id, ATTACHED, fp)
            client.set_tag(own.info.run_id, "git.revision", revision)
        times = (own.info.start_time, own.info.end_time) if own is not None else stage_times(run["timing"])
        with _run(mlflow, client, experiment_id, "train", {**std("python -m pipeline train"), **tags},
                  parent=parent_id, times=times, run_id=own.info.run_id if own is not None else None) as child:
            model = fill_train(mlflow, client, child.info.run_id, params, run, fp, exp_name, revision, model_name)
        log_summary(mlflow, run, model, test)
        if model and model["version"] is not None:
            describe_version(client, model, run, params, exp_name, revision)

        if run["classifier"]:
            with _run(mlflow, client, experiment_id, "classifier", {**std("python -m pipeline classifier"), **tags},
                      parent=parent_id, times=stage_times(run["classifier_timing"])):
                mlflow.log_params({k: v for k, v in flat.items() if k.startswith("classifier.")})
                mlflow.log_metrics(_numeric(run["classifier"]))

        sampled = model_tags(model)
        for name, cell in run["cells"].items():
            with _run(mlflow, client, experiment_id, f"sample/{name}",
                      {**std("python -m pipeline sample"), **tags, **sampled},
                      parent=parent_id, times=stage_times(cell["info"])) as child:
                sampler = params.samplers[cell["sampler"]].model_dump()
                guidance = params.guidance[cell["guidance"]].model_dump() if cell["guidance"] else {}
                mlflow.log_params({"sampler": cell["sampler"], "steps": cell["steps"],
                                   **{f"sampler.{k}": v for k, v in sampler.items()},
                                   **({"guidance": cell["guidance"]} if cell["guidance"] else {}),
                                   **{f"guidance.{k}": json.dumps(v) if isinstance(v, tuple) else v
                                      for k, v in guidance.items()},
                                   **{k: v for k, v in flat.items() if k.startswith("sample.")}})
                mlflow.log_metrics({**_numeric(cell["metrics"]), **{f"sampling.{k}": v for k, v in
                                                                     _numeric(cell["info"]).items()
                                                                     if k in ("seconds", "images_per_second")}})
                _log_history(client, child.info.run_id, system_metrics.mlflow_metrics(cell["system"]))
                for kind in ("grid", "strip"):  # sample grid, denoising strip x_T … x_0
                    if cell[kind].is_file():
                        from PIL import Image

                        mlflow.log_image(Image.open(cell[kind]), artifact_file=f"{kind}_{name}.png")
        mlflow.set_tag("mlflow.note.content", run_description(run, params, exp_name, revision, model))
        # last: a run cut off half-way has no fingerprint, so it is logged again in full
        mlflow.set_tag(FINGERPRINT, fp)
    untag(client, experiment_id, fp)
    return parent_id


def log_summary(mlflow, run: dict, model: dict | None, test: dict | None) -> None:
    """The parent's metrics; those that describe the logged model (MODEL_METRICS) linked to it and to the
    split they were measured on (the model page's metrics and "Datasets used")."""
    metrics = summary_metrics(run)
    train = (run["live"] or {}).get("dataset")
    splits = {"train": tracking.training_dataset(mlflow, train) if train else None,
              "test": tracking.training_dataset(mlflow, test) if test else None}
    linked: dict[str, dict] = {}
    for key, split in MODEL_METRICS.items():
        if model and key in metrics and splits[split] is not None:
            linked.setdefault(split, {})[key] = metrics.pop(key)
    mlflow.log_metrics(metrics)
    for split, values in linked.items():
        mlflow.log_metrics(values, model_id=model["model_id"], dataset=splits[split])


def model_tags(model: dict | None) -> dict[str, str]:
    """What a sample run sampled: the registered version of the checkpoint (models/model_ema.pt)."""
    if not model:
        return {}
    tags = {"model.id": model["model_id"]}
    if model["version"] is not None:
        name, version = model["version"].name, model["version"].version
        tags.update({"model.name": name, "model.version": str(version), "model.uri": f"models:/{name}/{version}"})
    return tags


def fill_train(mlflow, client, run_id: str, params: Params, run: dict, fp: str, exp_name: str, revision: str,
               model_name: str | None) -> dict | None:
    """Give train's run (its own, logged live, or a new one) whatever of the stage's outputs it
    lacks: params, the loss / lr / grad_norm histories, its figures as tags, the system metrics,
    the preview grids, the training data set, the model (registered once per pipeline run).
    Returns the logged model ({"model_id", "version"}: ``log_model``), None when none is logged."""
    from mlflow.entities import Metric
    from PIL import Image

    have = client.get_run(run_id)
    mlflow.log_params({k: v for k, v in tracking.mlflow_params(params, "train").items() if k not in have.data.params})
    when = (run["timing"] or {}).get("ended_ms") or tracking.now_ms()  # points filled in: when train wrote them
    history = []
    for key in HISTORY:
        logged = {m.step for m in client.get_metric_history(run_id, key)} if key in have.data.metrics else set()
        history += [Metric(key, row[key], when, row["step"]) for row in run["history"]
                    if row[key] is not None and row["step"] not in logged]
    if not any(k.startswith(system_metrics.PREFIX) for k in have.data.metrics):  # the run page's "System metrics"
        history += system_metrics.mlflow_metrics(run["system"])
    _log_history(client, run_id, history)
    # one value each: tags (a one-point metric is a chart card of its own beside the curves)
    final = {**flatten(run["train"] or {}), **{f"train.{k}": v for k, v in (run["timing"] or {}).items()
                                               if not k.endswith("_ms")}}
    mlflow.set_tags({k: str(v) for k, v in final.items() if k not in have.data.tags})
    logged = image_steps(client, run_id)
    for step, path in run["previews"]:
        if step not in logged:
            with Image.open(path) as im:
                mlflow.log_image(im.copy(), key=IMAGE_KEY, step=step, timestamp=int(path.stat().st_mtime * 1000))
    data = (run["live"] or {}).get("dataset")
    if data:
        ds = tracking.training_dataset(mlflow, data)
        if not any(d.dataset.digest == ds.digest for d in (have.inputs.dataset_inputs if have.inputs else [])):
            mlflow.log_input(ds, context="training", tags={"sha256": data["sha256"]})
    if data and run["model"].is_file():
        return log_model(mlflow, client, have, run, params, data, fp, exp_name, revision, model_name)
    return None


def log_model(mlflow, client, have, run: dict, params: Params, data: dict, fp: str, exp_name: str, revision: str,
              model_name: str | None) -> dict:
    """The EMA model as a pyfunc (pipeline/mlflow_model.py: samples images) with its signature,
    in train's run, registered as a new version of ``model_name`` (one per pipeline run);
    {"model_id": the logged model, "version": the registered ModelVersion or None}. A model an
    earlier, cut-off attempt logged or registered is found, not logged again."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from pipeline import mlflow_model

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
        code_paths=[str(Path(mlflow_model.__file__).parents[1] / "ddpm")], signature=signature,
        pip_requirements=[f"{p}=={metadata.version(p)}" for p in ("mlflow", "torch", "numpy")],
        registered_model_name=None if registered else model_name,
        params=tracking.mlflow_params(params, "train"),
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


def _fmt(value, spec: str = "{:.3f}") -> str:
    return "—" if value is None else spec.format(value)


def _results(run: dict) -> str:
    """One sentence of the run's results, from its metrics files."""
    best = (run["fid"] or {}).get("best") or {}
    floor = (run.get("floor") or {}).get("floor") or {}
    nll = (run.get("nll") or {}).get("nll") or {}
    den = (run.get("denoise") or {}).get("denoise") or {}
    return (f"best FID {_fmt(best.get('fid'), '{:.2f}')} ({best.get('sampler')}, {best.get('steps')} steps; "
            f"real-data floor {_fmt(floor.get('fid'), '{:.2f}')}), bits/dim {_fmt(nll.get('bits_per_dim'))}, "
            f"held-out ε-MSE {_fmt(den.get('ema_mse'), '{:.4f}')} with the EMA weights "
            f"({_fmt(den.get('raw_mse'), '{:.4f}')} raw)")


def run_description(run: dict, params: Params, exp_name: str, revision: str, model: dict | None) -> str:
    """The parent run's description (``mlflow.note.content``, markdown): what ran, what came out, where to look."""
    version = (model or {}).get("version")
    lines = [f"DVC experiment **{exp_name}** at git revision `{revision[:10]}`: {_results(run)}.", "",
             f"Data {params.data.name}; {params.schedule} schedule, {params.prediction}-prediction, "
             f"{params.train.steps} training steps; {params.sample.num_samples} samples per cell, "
             f"extractor {params.fid.extractor}.", ""]
    if version is not None:
        lines += [f"Model: `models:/{version.name}/{version.version}` (the child run *train*; "
                  f"`models:/{version.name}@{BEST}` is the best version scored like it).", ""]
    lines += ["Where to look: Artifacts → `reports/report.html` (the report); child run *train* → Model metrics "
              "(loss, lr, grad_norm, and the card *samples*: the preview grids, one per step on its slider); "
              "child runs *sample/&lt;sampler&gt;-&lt;steps&gt;* → Artifacts (grid, denoising strip)."]
    return "\n".join(lines)


def model_description(run: dict, params: Params, exp_name: str, revision: str, uri: str) -> str:
    """The registered version's description: which weights, trained how and on what, how good, how to use."""
    data = (run["live"] or {}).get("dataset") or {}
    return (f"EMA weights (models/model_ema.pt) of DVC experiment {exp_name} at git revision {revision[:10]}: "
            f"{params.train.steps} steps of batch {params.train.batch_size} on {data.get('name')} "
            f"(sha256 {str(data.get('sha256'))[:12]}…); {_results(run)}; FID of "
            f"{params.sample.num_samples} samples with the {params.fid.extractor} extractor against the test split. "
            f"Sample: mlflow.pyfunc.load_model(\"{uri}\").predict(pandas.DataFrame({{\"seed\": range(16)}}), "
            f"params={{\"sampler\": \"ddim\", \"steps\": 50}}) → uint8 images [N, C, H, W].")


def untag(client, experiment_id: str, fp: str) -> None:
    """Remove LOGGING from the runs of a complete attempt: FINGERPRINT on the parent says it all."""
    for run in client.search_runs([experiment_id], filter_string=f"tags.`{LOGGING}` = '{fp}'", max_results=10000):
        client.delete_tag(run.info.run_id, LOGGING)


def tidy(client, experiment_id: str, fp: str):
    """Finish what an interrupted ``log`` of run ``fp`` left behind: a complete parent (it has
    its fingerprint) still RUNNING, and its children, are marked FINISHED; the runs of an
    incomplete attempt are marked FAILED and deleted. Returns the complete parent or None."""
    def search(key: str, value: str) -> list:
        return client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=10000)

    complete = search(FINGERPRINT, fp)
    keep = complete[0] if complete else None
    if keep is not None:
        for run in [keep, *search("mlflow.parentRunId", keep.info.run_id)]:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "FINISHED")
    for run in search(LOGGING, fp):  # every attempt's parent and children
        if keep is not None and keep.info.run_id in (run.info.run_id, run.data.tags.get("mlflow.parentRunId")):
            continue
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, "pipeline.aborted", "cut off while logging; the run was logged again in full")
        client.delete_run(run.info.run_id)
    return keep


def publish(mlflow, experiment: str, params_path: Path, meta: dict, root: Path = Path(".")) -> str:
    """Log the run under ``root`` unless a run with its fingerprint exists; says which it did.
    Raises whatever MLflow raises when the server cannot be reached."""
    params = load_params(params_path)
    run = collect(params, root)
    fp = meta["fingerprint"]
    uri = mlflow.get_tracking_uri()
    # Serialise first use of a fresh database and check-then-log across parallel stages.
    with lock():
        client = mlflow.MlflowClient()
        exp_id = tracking.experiment_id(client, experiment, uri)
        mlflow.set_experiment(experiment_id=exp_id)
        found = tidy(client, exp_id, fp)
        if found is not None:
            return f"already in MLflow as run {found.info.run_id}"
        run_id = log_run(mlflow, params, params_path, run, meta["exp_name"], meta["revision"], fp, root,
                         experiment_id=exp_id, uri=uri, model_name=experiment)
    link = tracking.ui_url(uri, exp_id, run_id)
    return (f"MLflow run {run_id} in experiment {experiment!r} (DVC experiment {meta['exp_name']})"
            + (f", {link}" if link else ""))


def same_uri(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.rstrip("/") == b.rstrip("/")


def entries(uri: str | None = None) -> list[Path]:
    """The runs waiting in the outbox (for ``uri`` only, when given)."""
    found = sorted(outbox().glob("*/meta.json")) if outbox().is_dir() else []
    out = []
    for meta_file in found:
        try:
            target = json.loads(meta_file.read_text()).get("tracking_uri")
        except (OSError, ValueError):
            target = None
        if uri is None or same_uri(target, uri):
            out.append(meta_file.parent)
    return out


def _remove_leftovers() -> None:
    """Temporary folders of a stash or a removal that was killed half-way (call holding the lock)."""
    for tmp in outbox().glob(".*") if outbox().is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(entry: Path) -> None:
    """Take an entry out of the outbox at once (a rename), then delete its files (call holding
    the lock; a parallel `log` may have removed it already)."""
    trash = entry.with_name(f".removed.{entry.name}")
    shutil.rmtree(trash, ignore_errors=True)  # left by a removal that was killed
    if entry.is_dir():
        entry.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def stash(params_path: Path, meta: dict) -> Path:
    """Copy the run's files into the outbox (atomically: a temporary folder renamed into place)."""
    uri_hash = hashlib.sha256(meta["tracking_uri"].encode()).hexdigest()[:8]
    entry = outbox() / f"{meta['fingerprint']}-{uri_hash}"
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with lock():
        _remove_leftovers()
        return _stash(params_path, meta, entry)


def _stash(params_path: Path, meta: dict, entry: Path) -> Path:
    if entry.is_dir():
        return entry
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        for pattern in RUN_FILES:
            for src in Path(".").glob(pattern):
                dst = tmp / src
                dst.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        shutil.copy2(params_path, tmp / "params.yaml")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.rename(entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not entry.is_dir():  # not merely a parallel stage that stashed the same run first
            raise
    return entry


def flush(mlflow, uri: str, waiting: list[Path]) -> tuple[int, list[str]]:
    """Log the outbox ``waiting`` runs to ``uri``, removing each once it is in MLflow; (runs done, errors)."""
    done, errors = 0, []
    mlflow.set_tracking_uri(uri)
    for entry in waiting:
        try:
            meta = json.loads((entry / "meta.json").read_text())
            message = publish(mlflow, meta["experiment"], entry / "params.yaml", meta, root=entry)
        except Exception as e:
            errors.append(f"{entry}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            break  # the server is down, or this entry is broken: keep it for the next try
        with lock():
            _remove(entry)
        done += 1
        print(f"sync: {entry.name}: {message} at {uri}")
    return done, errors


def main(params_path: Path, tracking_uri: str | None, experiment: str) -> None:
    params = load_params(params_path)
    run = collect(params)
    if run["fid"] is None:
        raise FileNotFoundError("metrics/fid.json does not exist: run the report stage first")
    exp_name = experiment_name()
    revision = git_revision()
    fp = fingerprint(to_flat_dict(params), run, exp_name, revision)
    uri = tracking_uri or default_tracking_uri()
    meta = {"fingerprint": fp, "exp_name": exp_name, "revision": revision, "experiment": experiment,
            "tracking_uri": uri}

    mlflow = tracking.mlflow_module()
    try:
        mlflow.set_tracking_uri(uri)
        message = publish(mlflow, experiment, params_path, meta)
    except Exception as e:  # tracking is best-effort: the DVC metrics are the record
        entry = stash(params_path, meta)
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"warning: could not log to MLflow at {uri}: {type(e).__name__}: {first}\n"
              f"warning: the DVC metrics are written; this run waits in {entry}: "
              "`python -m pipeline sync` logs it once the server is back")
        return
    print(f"log: {message} at {uri}")
    done, errors = flush(mlflow, uri, entries(uri))
    for error in errors:
        print(f"warning: could not log a run from the outbox: {error}")
    others = len(entries()) - len(entries(uri))
    if others:
        print(f"log: {others} run(s) in {outbox()} wait for other tracking URIs: `python -m pipeline sync`")


def sync(to: str | None = None) -> None:
    """Log the runs waiting in the outbox, each to the tracking URI it was meant for, or all to
    ``to``; fails (one line) when some cannot be logged."""
    mlflow = tracking.mlflow_module()
    if outbox().is_dir():
        with lock():
            _remove_leftovers()
    waiting = entries()
    if to is not None:
        targets = {to: waiting}
    else:
        targets = {}
        for entry in waiting:
            uri = json.loads((entry / "meta.json").read_text()).get("tracking_uri")
            if uri is None:
                raise OutputError(f"{entry} does not say which tracking URI it was meant for: "
                                  "`python -m pipeline sync --to URI` logs it to URI")
            targets.setdefault(uri.rstrip("/"), []).append(entry)
    done, errors = 0, []
    for uri, batch in targets.items():
        n, errs = flush(mlflow, uri, batch)
        done, errors = done + n, errors + [f"at {uri}: {e}" for e in errs]
    if errors:
        raise ExternalError(f"could not log to MLflow {errors[0]} ({len(entries())} run(s) still in {outbox()})")
    print(f"sync: {done} run(s) logged to {', '.join(targets) or 'MLflow'}; the outbox is empty")
