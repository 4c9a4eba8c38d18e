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

One pipeline run is one parent run. Every run the stage opens carries the tag
``pipeline.logging = <fingerprint>`` from its start; the parent gets
``pipeline.fingerprint`` last. A ``log`` killed half-way (``kill -9``, a server that went
away) leaves runs with the first tag and no complete parent: the next ``log`` or ``sync``
of the same pipeline run marks them FAILED and deletes them (``mlflow gc`` purges them)
before it logs the run in full; a complete parent killed before it was closed is marked
FINISHED.

If the tracking server cannot be reached the stage warns and succeeds (the DVC metrics
are already written) after a few seconds (one HTTP retry), and copies what it would
have logged into the outbox ``<repo root>/.mlflow-outbox/<fingerprint>-<uri hash>/``,
with the tracking URI it was meant for. ``python -m pipeline sync`` logs each waiting run
to its own tracking URI (``sync --to URI`` sends them all elsewhere, on purpose); the
`log` stage sends the runs waiting for its URI whenever it reaches it. Nothing is lost,
nothing is logged twice, and nothing goes to a server it was not meant for.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline import system_metrics
from pipeline.common import OutputError, flatten, git_revision, read_losses, repo_root
from pipeline.params import Params, load_params, to_flat_dict


OUTBOX = ".mlflow-outbox"
FINGERPRINT, LOGGING = "pipeline.fingerprint", "pipeline.logging"  # tags: complete run; run being logged
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
            "nll": _read(root / "metrics/nll.json"), "ema": _read(root / "metrics/ema.json"),
            "denoise": _read(root / "metrics/denoise.json"), "losses": read_losses(root / "plots/train_loss.csv"),
            "cells": cells,
            "system": system_metrics.read(root / "logs/train_system.json")}


def fingerprint(flat_params: dict, run: dict, exp_name: str, revision: str) -> str:
    summary = {"params": flat_params, "exp": exp_name, "rev": revision, "train": run["train"],
               "classifier": run["classifier"], "nll": run.get("nll"), "ema": run.get("ema"),
               "denoise": run.get("denoise"),
               "cells": {k: c["metrics"] for k, c in run["cells"].items()}}
    return hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _numeric(d: dict | None, prefix: str = "") -> dict[str, float]:
    return {k: float(v) for k, v in flatten(d or {}, prefix).items() if isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _log_history(client, run_id: str, metrics: list) -> None:
    """Metric histories (``Metric`` entities with their steps), in batches MLflow accepts."""
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_run(mlflow, params: Params, params_path: Path, run: dict, exp_name: str, revision: str, fp: str,
            root: Path = Path(".")) -> str:
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    flat = to_flat_dict(params)
    tags = {"dvc.exp_name": exp_name, "git.revision": revision, LOGGING: fp}
    with mlflow.start_run(run_name=exp_name, tags=tags) as parent:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()})
        summary = {**_numeric(run["train"], "train."), **_numeric(run["classifier"], "classifier."),
                   **_numeric(run["fid"]), **_numeric(run.get("nll"), "nll."), **_numeric(run.get("ema"), "ema."),
                   **_numeric({k: v for k, v in (run.get("denoise") or {}).items() if k != "by_timestep"}, "denoise.")}
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
        mlflow.set_tag(FINGERPRINT, fp)
        return parent.info.run_id


def _mlflow():
    # A dead server should cost seconds, not minutes of retries (defaults: 7 retries, backoff 2, 120 s).
    # MLflow reads these three as integers (a "0.5" made every HTTP request raise ValueError).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return mlflow


_LOCKS: dict = {}


def lock():
    """The repository's MLflow lock (one object per process, so that holding it nests)."""
    from filelock import FileLock

    path = str(repo_root() / ".mlflow.lock")
    return _LOCKS.setdefault(path, FileLock(path, timeout=600))


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
    # Serialise first use of a fresh database and check-then-log across parallel stages.
    with lock():
        exp = mlflow.set_experiment(experiment)
        # again by id: when two processes create the experiment at once, MLflow returns it without making it active
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        client = mlflow.MlflowClient()
        if "mlflow.experimentKind" not in exp.tags:  # the UI opens on the runs table, not the GenAI view
            client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
        found = tidy(client, exp.experiment_id, fp)
        if found is not None:
            return f"already in MLflow as run {found.info.run_id}"
        run_id = log_run(mlflow, params, params_path, run, meta["exp_name"], meta["revision"], fp, root)
    return f"MLflow run {run_id} in experiment {experiment!r} (DVC experiment {meta['exp_name']})"


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
    exp_name = os.environ.get("DVC_EXP_NAME") or "workspace"
    revision = git_revision()
    fp = fingerprint(to_flat_dict(params), run, exp_name, revision)
    uri = tracking_uri or default_tracking_uri()
    meta = {"fingerprint": fp, "exp_name": exp_name, "revision": revision, "experiment": experiment,
            "tracking_uri": uri}

    mlflow = _mlflow()
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
    mlflow = _mlflow()
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
        raise RuntimeError(f"could not log to MLflow {errors[0]} ({len(entries())} run(s) still in {outbox()})")
    print(f"sync: {done} run(s) logged to {', '.join(targets) or 'MLflow'}; the outbox is empty")
