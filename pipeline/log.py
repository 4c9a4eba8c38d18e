"""Stage `log`: send one pipeline run to MLflow.

One parent run per pipeline run (named and tagged with the DVC experiment name and
the git revision) holding every param, the summary metrics and the report; child runs
for `train` (with the loss curve as a metric history), `classifier`, and one per
sampler × steps (× guidance) cell (FID/KID/precision/recall/IS, class accuracy, throughput,
sample grid and denoising strip). `train` and each cell carry the system metrics their stage recorded
while it worked (``system/...`` histories: CPU, memory, disk, network, GPU; see
pipeline/system_metrics.py). The parent holds the report (markdown, self-contained
HTML) and the figures (FID vs steps, loss curve) under `reports/`.

The stage reads only files the other stages wrote, and runs on every `dvc repro` /
`dvc exp run` (always_changed), so experiments restored from the run-cache are
logged too. A fingerprint of params + metrics + experiment + revision is stored as a
tag; a run already logged is not logged twice (the check and the logging hold one file
lock, so parallel stages against a fresh ``mlflow.db`` neither crash nor duplicate).

If the tracking server cannot be reached the stage warns and succeeds (the DVC metrics
are already written) after a few seconds (one HTTP retry), and copies what it would
have logged into the outbox ``<repo root>/.mlflow-outbox/<fingerprint>/``.
``python -m pipeline sync`` logs the outbox and empties it; the `log` stage does the
same whenever it reaches the server. Nothing is lost and nothing is logged twice.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline import system_metrics
from pipeline.common import git_revision, read_losses, repo_root
from pipeline.params import Params, load_params, to_flat_dict


OUTBOX = ".mlflow-outbox"
# What `collect` reads, relative to the workspace: copied into the outbox when unreachable.
RUN_FILES = ("metrics", "plots", "reports", "logs", "samples/*/info.json", "samples/*/grid.png",
             "samples/*/strip.png", "samples/*/system.json")


def default_tracking_uri() -> str:
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


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
            "nll": _read(root / "metrics/nll.json"), "losses": read_losses(root / "plots/train_loss.csv"),
            "cells": cells,
            "system": system_metrics.read(root / "logs/train_system.json")}


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


def _log_history(client, run_id: str, metrics: list) -> None:
    """Metric histories (``Metric`` entities with their steps), in batches MLflow accepts."""
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_run(mlflow, params: Params, params_path: Path, run: dict, exp_name: str, revision: str, fp: str,
            root: Path = Path(".")) -> str:
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    flat = to_flat_dict(params)
    tags = {"dvc.exp_name": exp_name, "git.revision": revision}
    with mlflow.start_run(run_name=exp_name, tags=tags) as parent:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()})
        summary = {**_numeric(run["train"], "train."), **_numeric(run["classifier"], "classifier."),
                   **_numeric(run["fid"]), **_numeric(run.get("nll"), "nll.")}
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(params_path))
        for folder in ("reports", "plots"):
            if (root / folder).is_dir():
                mlflow.log_artifacts(str(root / folder), folder)

        with mlflow.start_run(run_name="train", nested=True, tags=tags) as child:
            mlflow.log_params({k: v if not isinstance(v, list) else json.dumps(v) for k, v in flat.items()
                               if k.split(".")[0] in ("seed", "schedule", "prediction", "timesteps", "loss", "variance",
                                                         "timestep_sampling", "hybrid_lambda", "conditioning",
                                                         "cond_drop", "model", "train")})
            history = [Metric("loss", loss, 0, step) for step, loss in run["losses"]]
            history += system_metrics.mlflow_metrics(run["system"])  # the run page's "System metrics"
            _log_history(client, child.info.run_id, history)
            mlflow.log_metrics({**_numeric(run["train"]), **_numeric(run["timing"])})

        if run["classifier"]:
            with mlflow.start_run(run_name="classifier", nested=True, tags=tags):
                mlflow.log_params({k: v for k, v in flat.items() if k.startswith("classifier.")})
                mlflow.log_metrics(_numeric(run["classifier"]))

        for name, cell in run["cells"].items():
            with mlflow.start_run(run_name=f"sample/{name}", nested=True, tags=tags) as child:
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
        # last: a run cut off half-way has no fingerprint, so it is logged again in full
        mlflow.set_tag("pipeline.fingerprint", fp)
        return parent.info.run_id


def _mlflow():
    # A dead server should cost seconds, not minutes of retries (defaults: 7 retries, backoff 2, 120 s).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0.5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return mlflow


def publish(mlflow, experiment: str, params_path: Path, meta: dict, root: Path = Path(".")) -> str:
    """Log the run under ``root`` unless a run with its fingerprint exists; says which it did.
    Raises whatever MLflow raises when the server cannot be reached."""
    from filelock import FileLock

    params = load_params(params_path)
    run = collect(params, root)
    fp = meta["fingerprint"]
    # Serialise first use of a fresh database and check-then-log across parallel stages.
    with FileLock(str(repo_root() / ".mlflow.lock"), timeout=600):
        exp = mlflow.set_experiment(experiment)
        if "mlflow.experimentKind" not in exp.tags:  # the UI opens on the runs table, not the GenAI view
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, "mlflow.experimentKind",
                                                     "custom_model_development")
        found = mlflow.search_runs(filter_string=f"tags.`pipeline.fingerprint` = '{fp}'", output_format="list")
        if found:
            return f"already in MLflow as run {found[0].info.run_id}"
        run_id = log_run(mlflow, params, params_path, run, meta["exp_name"], meta["revision"], fp, root)
    return f"MLflow run {run_id} in experiment {experiment!r} (DVC experiment {meta['exp_name']})"


def stash(params_path: Path, meta: dict) -> Path:
    """Copy the run's files into the outbox (atomically: a temporary folder renamed into place)."""
    entry = outbox() / meta["fingerprint"]
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
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


def flush(mlflow, uri: str) -> tuple[int, list[str]]:
    """Log every run in the outbox, removing each once it is in MLflow; (runs done, errors)."""
    done, errors = 0, []
    entries = sorted(outbox().glob("*/meta.json")) if outbox().is_dir() else []
    for meta_file in entries:
        entry = meta_file.parent
        try:
            meta = json.loads(meta_file.read_text())
            message = publish(mlflow, meta["experiment"], entry / "params.yaml", meta, root=entry)
        except Exception as e:
            errors.append(f"{entry}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            break  # the server is down, or this entry is broken: keep it for the next try
        shutil.rmtree(entry, ignore_errors=True)
        done += 1
        print(f"sync: {entry.name}: {message} at {uri}")
    return done, errors


def main(params_path: Path, tracking_uri: str | None, experiment: str) -> None:
    params = load_params(params_path)
    run = collect(params)
    if run["fid"] is None:
        raise FileNotFoundError("metrics/fid.json does not exist: run the report stage first")
    exp_name = os.environ.get("DVC_EXP_NAME") or "workspace"
    revision = git_revision()
    fp = fingerprint(to_flat_dict(params), run, exp_name, revision)
    meta = {"fingerprint": fp, "exp_name": exp_name, "revision": revision, "experiment": experiment}

    mlflow = _mlflow()
    uri = tracking_uri or default_tracking_uri()
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
    done, errors = flush(mlflow, uri)
    for error in errors:
        print(f"warning: could not log a run from the outbox: {error}")


def sync(tracking_uri: str | None) -> None:
    """Log the runs waiting in the outbox; fails (one line) when some cannot be logged."""
    mlflow = _mlflow()
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    done, errors = flush(mlflow, uri)
    if errors:
        left = len(list(outbox().glob("*/meta.json")))
        raise RuntimeError(f"could not log to MLflow at {uri} ({left} run(s) still in {outbox()}): {errors[0]}")
    print(f"sync: {done} run(s) logged to {uri}; the outbox is empty")
