"""One pipeline run in MLflow, as the `log` stage logs it: a parent run holding every param, the
summary metrics, the best cell as tags, a description and the report; child runs for `train` (its
own live run when it can be attached), `classifier` and every sample cell. What is logged is read
from the stage outputs (``collect``); ``publish`` logs a run once (a fingerprint of its params,
metrics, experiment and revision), holding the repository's MLflow lock."""

import csv
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from pipeline.params.base import flatten
from pipeline.params.schema import Params, load_params, to_flat_dict
from pipeline.tracking import client as tracking
from pipeline.tracking import system_metrics
from pipeline.tracking.live import IMAGE_KEY, image_steps
from pipeline.tracking.registry import (BEST, best_tags, describe_version, log_model, model_tags, results,
                                        train_params)
from pipeline.tracking.tidy import FINGERPRINT, LOGGING, tidy, untag
from pipeline.workspace import repo_root

ATTACHED = "pipeline.attached"  # tag of train's own run once a parent holds it (not LOGGING: never deleted by tidy)
HISTORY = ("loss", "lr", "grad_norm")  # train's metric histories (plots/train_loss.csv)
NOT_LOGGED = ("report.md",)  # its images are relative links, which MLflow's markdown viewer does not show
# the parent's metrics that describe the logged model, and the split each was measured on
MODEL_METRICS = {"train.final_loss": "train", "best.fid": "test", "nll.bits_per_dim": "test",
                 "denoise.ema_mse": "test"}


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
    from the stage's own record; unknown ends are the block's). Stopped by Ctrl-C or SIGTERM, the run
    is marked KILLED with its end time (the next ``log`` deletes it: ``pipeline.tracking.tidy``)."""
    start, end = times
    if run_id is None:
        run_tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = client.create_run(experiment_id, start_time=start or tracking.now_ms(), tags=run_tags,
                                   run_name=name).info.run_id
    with mlflow.start_run(run_id=run_id, nested=parent is not None) as active:
        try:
            yield active
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a stop, not a failure (MLflow's own exit says FAILED)
            mlflow.end_run("KILLED")
            raise
    if end:  # closing the block ended it now; the work ended then
        client.set_terminated(run_id, "FINISHED", end_time=end)


def attachable(client, live: dict | None, uri: str, experiment_id: str, fp: str):
    """train's own MLflow run (``logs/train_mlflow.json``), when this pipeline run may hold it:
    at this tracking URI, in this experiment, and held by no other pipeline run's parent (it
    is, when DVC restored `train` from its run-cache: then a new run is made from the files)."""
    if not live or not live.get("run_id") or not tracking.same_uri(live.get("tracking_uri"), uri):
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

def fill_train(mlflow, client, run_id: str, params: Params, run: dict, fp: str, exp_name: str, revision: str,
               model_name: str | None) -> dict | None:
    """Give train's run (its own, logged live, or a new one) whatever of the stage's outputs it
    lacks: params, the loss / lr / grad_norm histories, its figures as tags, the system metrics,
    the preview grids, the training data set, the model (registered once per pipeline run).
    Returns the logged model ({"model_id", "version"}: ``log_model``), None when none is logged."""
    from mlflow.entities import Metric
    from PIL import Image

    have = client.get_run(run_id)
    mlflow.log_params({k: v for k, v in train_params(run).items() if k not in have.data.params})
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

def run_description(run: dict, params: Params, exp_name: str, revision: str, model: dict | None) -> str:
    """The parent run's description (``mlflow.note.content``, markdown): what ran, what came out, where to look."""
    version = (model or {}).get("version")
    lines = [f"DVC experiment **{exp_name}** at git revision `{revision[:10]}`: {results(run)}.", "",
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


def publish(mlflow, experiment: str, params_path: Path, meta: dict, root: Path = Path(".")) -> str:
    """Log the run under ``root`` unless a run with its fingerprint exists; says which it did.
    Raises whatever MLflow raises when the server cannot be reached."""
    params = load_params(params_path)
    run = collect(params, root)
    fp = meta["fingerprint"]
    uri = mlflow.get_tracking_uri()
    # Serialise first use of a fresh database and check-then-log across parallel stages.
    with tracking.lock():
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
