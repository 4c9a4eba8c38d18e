"""What `train` (logging live) and `log` share about MLflow: where it is, a client that
gives up within seconds when the server is down, the experiment, the standard tags of a
run, the training data as an MLflow dataset, and the repository's lock.

The UI view. MLflow 3.17's UI does not read the experiment's ``mlflow.experimentKind``
tag to choose between its GenAI view (traces, "Evaluations") and its model-training view
(runs, charts, models): it shows the view of its ``workflowType`` — the URL parameter
``?workflowType=machine_learning`` or, without one, the choice last made with the
sidebar's switch, kept in the browser (GenAI when never made). So the pipeline prints
links that carry the parameter (``ui_url``), and still tags the experiment
``custom_model_development`` for the UI's experiment-type selector and older 3.x UIs.

The runs table. Its default columns (Source, Models, Dataset) show no metric; the table's state is
the browser's. A saved view of the experiment (the UI's "Views" menu: an experiment tag
``mlflow.sharedViewState.<id>`` holding ``{"name", "createdAt", "state"}``, the state the UI's
"Save view" writes) opens the table with the headline metrics as columns, and the link of the
runs page names it (``viewStateShareKey``): ``RUNS_VIEW``, written with the experiment
(``experiment_id``) and by ``python -m pipeline ui``.

Nothing here imports MLflow at module level (``import mlflow`` takes about 2 s).
"""

import getpass
import json
import os
import subprocess
from pathlib import Path

from pipeline.params.base import flatten
from pipeline.workspace import git_revision, repo_root

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_VIEW = "workflowType=machine_learning"  # the model-training view of MLflow 3.17's UI
VIEW_TAG = "mlflow.sharedViewState."  # + the id of a saved view of the runs table (MLflow 3.17's UI)
RUNS_VIEW = "ddpm-pipeline"  # the id of ours, opened by the link of the runs page
RUNS_VIEW_NAME = "Headline metrics (ddpm-pipeline)"
# its columns: the parent runs' best FID and cell, floor, bits/dim, denoising MSE; the sample cells' FID; the model
RUNS_COLUMNS = (("metrics", "best.fid"), ("tags", "best.sampler"), ("tags", "best.steps"), ("metrics", "floor.fid"),
                ("metrics", "nll.bits_per_dim"), ("metrics", "denoise.ema_mse"), ("metrics", "fid"),
                ("attributes", "Models"))
DIGEST_CHARS = 36  # MLflow's limit on a dataset digest (MAX_DATASET_DIGEST_SIZE)


def default_tracking_uri() -> str:
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def http_defaults() -> None:
    """HTTP retries that give up within seconds when the server is down (MLflow's defaults:
    7 retries, backoff 2, 120 s timeout), unless set. MLflow reads these three as integers
    (a "0.5" made every HTTP request raise ValueError)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def mlflow_module():
    """``mlflow``, with ``http_defaults``."""
    http_defaults()
    import mlflow

    return mlflow


_LOCKS: dict = {}


def lock():
    """The repository's MLflow lock (one object per process, so that holding it nests)."""
    from filelock import FileLock

    path = str(repo_root() / ".mlflow.lock")
    return _LOCKS.setdefault(path, FileLock(path, timeout=600))


def artifact_location(tracking_uri: str, name: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database for a sqlite URI
    (``<db folder>/mlruns/<name>``; MLflow's default, ``./mlruns`` of the working directory,
    would put them into DVC's temporary workspace of a queued experiment, deleted after it
    ran), the server's choice otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return (db.parent.resolve() / "mlruns" / safe).as_uri()


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The experiment ``name``, created (tagged for the model-training view, artifacts at
    ``artifact_location``) if it does not exist. Holds the lock: the first use of a fresh
    sqlite database creates its tables, which parallel processes must not do at once."""
    from mlflow.exceptions import MlflowException

    with lock():
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location(tracking_uri, name),
                                                tags=dict([EXPERIMENT_KIND, runs_view()]))
            except MlflowException:  # created meanwhile by a process that does not share the lock
                exp = client.get_experiment_by_name(name)
        if EXPERIMENT_KIND[0] not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        key, value = runs_view()
        if not same_view(exp.tags.get(key), value):
            client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id


def runs_view(created_ms: int | None = None) -> tuple[str, str]:
    """The experiment tag of the runs table's saved view ``RUNS_VIEW`` (see the module docstring): the headline
    metrics as columns, the newest runs first (so that the child runs stay under their parents)."""
    state = {"selectedColumns": [f"{kind}.`{name}`" for kind, name in RUNS_COLUMNS],
             "orderByKey": "attributes.start_time", "orderByAsc": False}
    created = created_ms if created_ms is not None else now_ms()
    return VIEW_TAG + RUNS_VIEW, json.dumps({"name": RUNS_VIEW_NAME, "createdAt": created, "updatedAt": created,
                                             "state": json.dumps(state)})


def same_view(a: str | None, b: str) -> bool:
    """Whether two saved views (tag values) show the same: name and state (not when they were made)."""
    try:
        return a is not None and all(json.loads(a).get(k) == json.loads(b)[k] for k in ("name", "state"))
    except (ValueError, AttributeError):
        return False


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def standard_tags(source: str) -> dict[str, str]:
    """MLflow's standard run tags: who, what ran (``source``, e.g. ``python -m pipeline train``)
    and the git commit, branch and remote it ran from (as far as git knows them)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": source}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    commit = git_revision()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if branch := git_branch():
        tags["mlflow.source.git.branch"] = branch
    if url := _git("remote", "get-url", "origin"):
        tags["mlflow.source.git.repoURL"] = url
    return tags


def git_branch() -> str | None:
    """The branch the code runs from: HEAD's; under ``dvc exp run`` (HEAD detached at the experiment's
    baseline commit, in the workspace or a temporary copy) the repository's branch at that commit
    (``DVC_EXP_BASELINE_REV``), the one checked out when several are; None when no branch is there."""
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        return branch
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git_revision()
    root = str(repo_root())
    names = (_git("-C", root, "for-each-ref", "--points-at", commit, "--format=%(refname:short)", "refs/heads")
             or "").splitlines()
    current = _git("-C", root, "symbolic-ref", "--short", "-q", "HEAD")
    return current if current in names else names[0] if names else None


def ui_url(tracking_uri: str, experiment: str, run_id: str | None = None) -> str | None:
    """The page of a run in the model-training view, or without ``run_id`` the experiment's runs in that view
    and ``RUNS_VIEW``, for an HTTP tracking URI (the UI's address)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    page = f"/runs/{run_id}?{UI_VIEW}" if run_id else f"/runs?{UI_VIEW}&viewStateShareKey={RUNS_VIEW}"
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment}{page}"


def training_dataset(mlflow, info: dict):
    """The training split as an MLflow dataset (for ``mlflow.log_input(ds, context="training")``),
    from ``info`` (what `train` records: name, source path, SHA-256 and shape of the uint8
    images). Its digest is the images' SHA-256, cut to MLflow's 36 characters (the whole one
    goes along as the input tag ``sha256``); schema and profile describe images and labels."""
    import warnings

    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    class Images(MetaDataset):
        @property
        def profile(self):
            return {"num_images": info["shape"][0], "image_shape": info["shape"][1:], "sha256": info["sha256"]}

        def to_dict(self):
            return {**super().to_dict(), "schema": json.dumps(self.schema.to_dict()),
                    "profile": json.dumps(self.profile)}

    # MLflow registers its local-file source twice (schemes "" and "file") and says so on every local path
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
    schema = TensorDatasetSchema(features=Schema([TensorSpec(np.dtype(np.uint8), [-1, *info["shape"][1:]], "images")]),
                                 targets=Schema([TensorSpec(np.dtype(np.int64), [-1], "labels")]))
    return Images(resolve_dataset_source(info["source"]), name=info["name"], digest=info["sha256"][:DIGEST_CHARS],
                  schema=schema)


def dataset_input(ds, sha256: str):
    """What ``mlflow.log_input(ds, context="training", tags={"sha256": ...})`` sends, for a
    client (``MlflowClient.log_inputs``) that logs to a run that is not the active one."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    d = ds.to_dict()
    entity = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                     schema=d.get("schema"), profile=d.get("profile"))
    return DatasetInput(dataset=entity, tags=[InputTag("mlflow.data.context", "training"), InputTag("sha256", sha256)])


def mlflow_params(params, keys: list[str]) -> dict:
    """The params of a stage that declares ``keys``, flat (``train.lr``), lists and mappings as JSON: the
    params of its MLflow run, the same whether `train` logs them live or `log` fills them in."""
    keys = [k for k in keys if "${" not in k]
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(params.model_dump(mode="json")).items()
            if any(k == key or k.startswith(key + ".") for key in keys)}


def same_uri(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.rstrip("/") == b.rstrip("/")


def now_ms() -> int:
    import time

    return int(time.time() * 1000)
