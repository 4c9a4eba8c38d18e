"""Stage `log`: send one pipeline run to MLflow.

One parent run per pipeline run (named and tagged with the DVC experiment name and
the git revision) holding every param, the summary metrics and the report; child runs
for `train` (with the loss curve as a metric history), `classifier`, and one per
sampler × steps cell (FID/KID/IS, throughput, sample grid).

The stage reads only files the other stages wrote, and runs on every `dvc repro` /
`dvc exp run` (always_changed), so experiments restored from the run-cache are
logged too. A fingerprint of params + metrics + experiment + revision is stored as a
tag; a run already logged is not logged twice. If the tracking server cannot be
reached the stage warns and succeeds (the DVC metrics are already written); the next
run of the stage logs what is missing.
"""

import hashlib
import json
import os
from pathlib import Path

from pipeline.common import git_revision, repo_root
from pipeline.params import Params, load_params, to_flat_dict


def default_tracking_uri() -> str:
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(params: Params) -> dict:
    """Everything this run produced that goes to MLflow, read from the stage outputs."""
    cells = {}
    for s in params.sample.samplers:
        for k in params.sample.steps:
            name = f"{s}-{k}"
            cells[name] = {"sampler": s, "steps": k, "metrics": _read(Path(f"metrics/cells/{name}.json")),
                           "info": _read(Path(f"samples/{name}/info.json")),
                           "grid": Path(f"samples/{name}/grid.png")}
    losses = []
    if Path("plots/train_loss.csv").is_file():
        for line in Path("plots/train_loss.csv").read_text().splitlines()[1:]:
            step, loss = line.split(",")
            losses.append((int(step), float(loss)))
    return {"train": _read(Path("metrics/train.json")), "timing": _read(Path("logs/train_timing.json")),
            "classifier": _read(Path("metrics/classifier.json")), "fid": _read(Path("metrics/fid.json")),
            "nll": _read(Path("metrics/nll.json")), "losses": losses, "cells": cells}


def fingerprint(flat_params: dict, run: dict, exp_name: str, revision: str) -> str:
    summary = {"params": flat_params, "exp": exp_name, "rev": revision, "train": run["train"],
               "classifier": run["classifier"], "nll": run.get("nll"),
               "cells": {k: c["metrics"] for k, c in run["cells"].items()}}
    return hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _numeric(d: dict | None, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_numeric(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def log_run(mlflow, params: Params, params_path: Path, run: dict, exp_name: str, revision: str, fp: str) -> str:
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    flat = to_flat_dict(params)
    tags = {"dvc.exp_name": exp_name, "git.revision": revision}
    with mlflow.start_run(run_name=exp_name, tags={**tags, "pipeline.fingerprint": fp}) as parent:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()})
        summary = {**_numeric(run["train"], "train."), **_numeric(run["classifier"], "classifier."),
                   **_numeric(run["fid"]), **_numeric(run.get("nll"), "nll.")}
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(params_path))
        for folder in ("reports", "plots"):
            if Path(folder).is_dir():
                mlflow.log_artifacts(folder, folder)

        with mlflow.start_run(run_name="train", nested=True, tags=tags) as child:
            mlflow.log_params({k: v if not isinstance(v, list) else json.dumps(v) for k, v in flat.items()
                               if k.split(".")[0] in ("seed", "schedule", "prediction", "timesteps", "loss", "variance",
                                                         "timestep_sampling", "hybrid_lambda", "model", "train")})
            history = [Metric("loss", loss, 0, step) for step, loss in run["losses"]]
            for i in range(0, len(history), 1000):
                client.log_batch(child.info.run_id, metrics=history[i:i + 1000])
            mlflow.log_metrics({**_numeric(run["train"]), **_numeric(run["timing"])})

        if run["classifier"]:
            with mlflow.start_run(run_name="classifier", nested=True, tags=tags):
                mlflow.log_params({k: v for k, v in flat.items() if k.startswith("classifier.")})
                mlflow.log_metrics(_numeric(run["classifier"]))

        for name, cell in run["cells"].items():
            with mlflow.start_run(run_name=f"sample/{name}", nested=True, tags=tags):
                sampler = params.samplers[cell["sampler"]].model_dump()
                mlflow.log_params({"sampler": cell["sampler"], "steps": cell["steps"],
                                   **{f"sampler.{k}": v for k, v in sampler.items()},
                                   **{k: v for k, v in flat.items() if k.startswith("sample.")}})
                mlflow.log_metrics({**_numeric(cell["metrics"]), **{f"sampling.{k}": v for k, v in
                                                                     _numeric(cell["info"]).items()
                                                                     if k in ("seconds", "images_per_second")}})
                if cell["grid"].is_file():
                    from PIL import Image

                    mlflow.log_image(Image.open(cell["grid"]), artifact_file=f"grid_{name}.png")
        return parent.info.run_id


def main(params_path: Path, tracking_uri: str | None, experiment: str) -> None:
    params = load_params(params_path)
    run = collect(params)
    if run["fid"] is None:
        raise FileNotFoundError("metrics/fid.json does not exist: run the report stage first")
    exp_name = os.environ.get("DVC_EXP_NAME") or "workspace"
    revision = git_revision()
    fp = fingerprint(to_flat_dict(params), run, exp_name, revision)

    # A dead server should cost seconds, not minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow
    from filelock import FileLock

    uri = tracking_uri or default_tracking_uri()
    try:
        mlflow.set_tracking_uri(uri)
        # Several queued experiments may create a fresh database at once: serialise set-up.
        with FileLock(str(repo_root() / ".mlflow.lock")):
            mlflow.set_experiment(experiment)
        found = mlflow.search_runs(filter_string=f"tags.`pipeline.fingerprint` = '{fp}'", output_format="list")
        if found:
            print(f"log: already in MLflow as run {found[0].info.run_id} ({uri}); nothing to do")
            return
        run_id = log_run(mlflow, params, params_path, run, exp_name, revision, fp)
    except Exception as e:  # tracking is best-effort: the DVC metrics are the record
        print(f"warning: could not log to MLflow at {uri}: {type(e).__name__}: {e}\n"
              "warning: the DVC metrics are written; run `python -m pipeline log` again to log this run")
        return
    print(f"log: MLflow run {run_id} in experiment {experiment!r} at {uri} (DVC experiment {exp_name})")
