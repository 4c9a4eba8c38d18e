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
from pipeline.tracking.live import IMAGE_KEY, image_files, image_steps
from pipeline.tracking.registry import (BEST, best_tags, describe_version, log_model, model_tags, results,
                                        train_params)
from pipeline.tracking.tidy import FINGERPRINT, LOGGING, tidy, untag
from pipeline.workspace import repo_root

ATTACHED = "pipeline.attached"  # tag of train's own run once a parent holds it (not LOGGING: never deleted by tidy)
HISTORY = ("loss", "lr", "grad_norm")  # train's metric histories (plots/train_loss.csv)
# the stage outputs the parent run holds, file by file (the report stage's and the plot data; report.md is not:
# its images are relative links, which MLflow's markdown viewer does not show), so that nothing else in those
# folders rides along (a study's report, a file of another commit)
PARENT_ARTIFACTS = ("reports/report.html", "reports/fid_vs_steps.png", "reports/precision_recall.png",
                    "reports/train_loss.png", "plots/fid_vs_steps.csv", "plots/fid_vs_sigma_rel.csv",
                    "plots/guidance_sweep.csv", "plots/train_loss.csv", "plots/train_lr.csv", "plots/nll_terms.csv",
                    "plots/denoise_by_timestep.csv")
# The parent's metrics: what measures the run (one chart each in its "Model metrics" tab, a column in the runs
# table), per block of the DVC metrics files; the other numbers there (counts, seconds, steps, the terms of the
# bound) are tags. Every cell's FID (fid.<sampler>.<steps>) and best.fid are metrics too.
PARENT_METRICS = {"floor": ("fid", "precision", "recall"), "nll": ("bits_per_dim", "bits_per_dim_stderr"),
                  "denoise": ("ema_mse", "raw_mse", "untrained_mse", "ema_over_raw"),
                  "classifier": ("test_accuracy",), "train": ("final_loss",)}
# A sample cell's metrics (the others, and f_score, are tags): the same names in every cell, so that any two cells
# (of one experiment or two) line up in MLflow's compare view, whose parallel-coordinates plot opens on the first
# metric by name: fid (class_accuracy for a class-conditional model). f_score is precision and recall in one.
CELL_METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall", "isc_mean", "isc_std", "class_accuracy")
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
            "artifacts": [path for path in PARENT_ARTIFACTS if (root / path).is_file()],
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


def _text(value: float) -> str:
    """A number as a tag: a whole number without its ``.0`` (a count), any other as Python writes it."""
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else str(value)


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


def summary_metrics(run: dict) -> tuple[dict[str, float], dict[str, str]]:
    """The parent's (metrics, tags): the numbers of the DVC metrics files under the names `dvc exp show` gives
    them, those that measure the run (``best.fid``, every ``fid.<sampler>.<steps>``, PARENT_METRICS) as
    metrics, the rest as tags (``best.steps`` is a tag of ``best_tags``: it names the best cell)."""
    numbers = {}
    for key in ("fid", "floor", "nll", "denoise", "ema", "classifier", "train"):
        numbers.update(_numeric(run.get(key)))
    numbers.pop("best.steps", None)
    measures = {f"{block}.{name}" for block, names in PARENT_METRICS.items() for name in names}
    metrics = {k: v for k, v in numbers.items() if k in measures or k == "best.fid" or k.startswith("fid.")}
    return metrics, {k: _text(v) for k, v in numbers.items() if k not in metrics}


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
        for path in run["artifacts"]:
            mlflow.log_artifact(str(root / path), str(Path(path).parent.as_posix()))
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
        cell_runs = {}
        for name, cell in run["cells"].items():
            with _run(mlflow, client, experiment_id, f"sample/{name}",
                      {**std("python -m pipeline sample"), **tags, **sampled},
                      parent=parent_id, times=stage_times(cell["info"])) as child:
                cell_runs[name] = child.info.run_id
                sampler = params.samplers[cell["sampler"]].model_dump()
                guidance = params.guidance[cell["guidance"]].model_dump() if cell["guidance"] else {}
                mlflow.log_params({"sampler": cell["sampler"], "steps": cell["steps"],
                                   **{f"sampler.{k}": v for k, v in sampler.items()},
                                   **({"guidance": cell["guidance"]} if cell["guidance"] else {}),
                                   **{f"guidance.{k}": json.dumps(v) if isinstance(v, tuple) else v
                                      for k, v in guidance.items()},
                                   **{k: v for k, v in flat.items() if k.startswith("sample.")}})
                scores = _numeric(cell["metrics"])
                mlflow.log_metrics({k: v for k, v in scores.items() if k in CELL_METRICS})
                mlflow.set_tags({**{k: _text(v) for k, v in scores.items() if k not in CELL_METRICS and k != "steps"},
                                 **{f"sampling.{k}": _text(v) for k, v in _numeric(cell["info"]).items()
                                    if k in ("seconds", "images_per_second")}})
                _log_history(client, child.info.run_id, system_metrics.mlflow_metrics(cell["system"]))
                for kind in ("grid", "strip"):  # sample grid, denoising strip x_T … x_0: one name in every cell,
                    if cell[kind].is_file():   # so that the compare view shows two cells' side by side
                        mlflow.log_artifact(str(cell[kind]))
        best = (run["fid"] or {}).get("best") or {}
        best_cell = cell_runs.get(f"{best.get('sampler')}-{best.get('steps')}")
        mlflow.set_tag("mlflow.note.content", run_description(run, params, exp_name, revision, model, best_cell))
        # last: a run cut off half-way has no fingerprint, so it is logged again in full
        mlflow.set_tag(FINGERPRINT, fp)
    untag(client, experiment_id, fp)
    return parent_id


def log_summary(mlflow, run: dict, model: dict | None, test: dict | None) -> None:
    """The parent's metrics; those that describe the logged model (MODEL_METRICS) linked to it and to the
    split they were measured on (the model page's metrics and "Datasets used")."""
    metrics, others = summary_metrics(run)
    mlflow.set_tags(others)
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
                mlflow.log_image(im.copy(), key=IMAGE_KEY, step=step, timestamp=int(path.stat().st_mtime * 1000),
                                 synchronous=True)  # fluent log_image is asynchronous by default: listed below
    if (note := train_description(client, run_id, run)) is not None:
        mlflow.set_tag("mlflow.note.content", note)
    data = (run["live"] or {}).get("dataset")
    if data:
        ds = tracking.training_dataset(mlflow, data)
        if not any(d.dataset.digest == ds.digest for d in (have.inputs.dataset_inputs if have.inputs else [])):
            mlflow.log_input(ds, context="training", tags={"sha256": data["sha256"]})
    if data and run["model"].is_file():
        return log_model(mlflow, client, have, run, params, data, fp, exp_name, revision, model_name)
    return None

def artifact_image(run_id: str, path: str, alt: str) -> str:
    """Markdown that shows the image artifact ``path`` of the run ``run_id`` in a run's description: a link to the
    UI's server, relative to the page (``get-artifact``), so it works wherever the UI is served."""
    from urllib.parse import quote

    return f"![{alt}](get-artifact?path={quote(path, safe='')}&run_uuid={run_id})"


def run_description(run: dict, params: Params, exp_name: str, revision: str, model: dict | None,
                    best_cell: str | None = None) -> str:
    """The parent run's description (``mlflow.note.content``, markdown): what ran, what came out (with the best
    cell's grid, from its run ``best_cell``), where to look."""
    version = (model or {}).get("version")
    best = (run["fid"] or {}).get("best") or {}
    # the best cell's grid first: the Overview shows a description's first lines, "Show more" the rest
    lines = [] if best_cell is None else [
        artifact_image(best_cell, "grid.png", f"samples of the best cell, {best.get('sampler')}-{best.get('steps')}"), ""]
    lines += [f"DVC experiment **{exp_name}** at git revision `{revision[:10]}`: {results(run)}.", "",
             f"Data {params.data.name}; {params.schedule} schedule, {params.prediction}-prediction, "
             f"{params.train.steps} training steps; {params.sample.num_samples} samples per cell, "
             f"extractor {params.fid.extractor}.", ""]
    if version is not None:
        lines += [f"Model: `models:/{version.name}/{version.version}` (the child run *train*; "
                  f"`models:/{version.name}@{BEST}` is the best version scored like it).", ""]
    lines += ["Where to look: Artifacts → `reports/report.html` (the report); child run *train* → Overview (the last "
              "preview grid) and Model metrics (loss, lr, grad_norm, and the card *samples*: the preview grids, one "
              "per step on its slider); child runs *sample/&lt;sampler&gt;-&lt;steps&gt;* → Artifacts (`grid.png`, "
              "`strip.png`: the same names in every cell, so that Compare shows two side by side)."]
    return "\n".join(lines)


def train_description(client, run_id: str, run: dict) -> str | None:
    """train's run description (markdown): the last preview grid, shown on its Overview (MLflow's *samples* card
    opens on step 0, the initial weights), and where the others are. None when the run has no preview."""
    last = image_files(client, run_id)
    if not last:
        return None
    step = max(last)
    return "\n".join([artifact_image(run_id, last[step], f"preview at step {step}"), "",
                      f"Preview of the EMA weights at step {step} of {(run['train'] or {}).get('final_step', step)} "
                      "(a 4×4 grid, 50 ancestral steps), above.", "",
                      "Every preview: Model metrics → card *samples* (it opens at step 0, the initial weights: move "
                      "its slider, or expand it with ⤢) or Artifacts → `images/`."])


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
