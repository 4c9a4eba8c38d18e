"""A study in MLflow: one parent run per study report (its verdict table, the report files, each
claim's difference and interval as metrics and verdict as a tag) holding the runs the `log` stage
made for the study's experiments as its children. Best effort, as the `log` stage: when MLflow
cannot be reached it warns, and the report files are the record.

The same report (the same verdicts from the same runs: the fingerprint of its numbers) is logged
once; a new report is a new parent run, and the experiments' runs move under it (a run has one
parent). Nothing here imports MLflow at module level (about 2 s)."""

import hashlib
import json
from pathlib import Path

from pipeline.tracking import client as tracking

FINGERPRINT = "study.fingerprint"  # set last: a study run without it was cut off and is logged again
LOGGING = "study.logging"  # set first: the fingerprint it is being logged for


def ensure_database(tracking_uri: str | None, experiment: str) -> None:
    """Create a sqlite tracking database and its experiment once, before queued experiments' stages
    (train's live run, log) would each create it at the same time, which can crash them."""
    uri = tracking_uri or tracking.default_tracking_uri()
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///").split("?")[0]).is_file():
        return
    mlflow = tracking.mlflow_module()
    mlflow.set_tracking_uri(uri)
    tracking.experiment_id(mlflow.MlflowClient(), experiment, uri)


def fingerprint(doc: dict) -> str:
    keep = {k: doc[k] for k in ("study", "base", "seeds", "experiments", "claims", "runs")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _experiment_run(client, exp_id: str, dvc_name: str):
    """The newest complete parent run the `log` stage made for the DVC experiment ``dvc_name``."""
    found = client.search_runs([exp_id], filter_string=f"tags.`dvc.exp_name` = '{dvc_name}' and "
                                                      "tags.`pipeline.fingerprint` != ''",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def log_study(mlflow, doc: dict, files: list[Path], experiment: str) -> tuple[str, str, bool, list[str], list[str]]:
    """(MLflow experiment id, study run id, whether it was logged now, DVC experiments made its children,
    those without a run). A study run of the same fingerprint cut off earlier is deleted first."""
    fp = fingerprint(doc)
    uri = mlflow.get_tracking_uri()
    with tracking.lock():
        client = mlflow.MlflowClient()
        exp_id = tracking.experiment_id(client, experiment, uri)
        same = client.search_runs([exp_id], filter_string=f"tags.`{FINGERPRINT}` = '{fp}'", max_results=1)
        new = not same
        if new:
            for cut in client.search_runs([exp_id], filter_string=f"tags.`{LOGGING}` = '{fp}'"):
                client.delete_run(cut.info.run_id)
            tags = {**tracking.standard_tags("python -m pipeline study report"), LOGGING: fp, "study.name": doc["study"],
                    "study.file": doc["path"], "git.revision": doc["commit"]}
            run_id = client.create_run(exp_id, tags=tags, run_name=f"study {doc['study']}").info.run_id
            with mlflow.start_run(run_id=run_id):
                mlflow.log_params({"base": " ".join(doc["base"]) or "(params.yaml)", "seeds": json.dumps(doc["seeds"]),
                                   **{f"experiment.{e['name']}": " ".join(e["overrides"]) or "(the base)"
                                      for e in doc["experiments"]}})
                metrics = {f"claim.{c['id']}.{k}": c[k] for c in doc["claims"]
                           for k in ("difference", "low", "high") if c[k] is not None}
                mlflow.log_metrics(metrics)
                mlflow.set_tags({f"claim.{c['id']}.verdict": c["verdict"] for c in doc["claims"]})
                mlflow.log_table({k: [c[k] for c in doc["claims"]] for k in
                                  ("id", "text", "source", "difference", "low", "high", "n_left", "n_right", "verdict")},
                                 artifact_file="verdicts.json")
                for f in files:
                    mlflow.log_artifact(str(f), "study")
                mlflow.set_tag(FINGERPRINT, fp)
        else:
            run_id = same[0].info.run_id
        linked, missing = [], []
        for r in doc["runs"]:
            if not r.get("dvc_experiment"):
                continue
            child = _experiment_run(client, exp_id, r["dvc_experiment"])
            if child is None:
                missing.append(r["dvc_experiment"])
                continue
            if child.data.tags.get("mlflow.parentRunId") != run_id:
                client.set_tag(child.info.run_id, "mlflow.parentRunId", run_id)
            linked.append(r["dvc_experiment"])
    return exp_id, run_id, new, linked, missing


def log(doc: dict, files: list[Path], tracking_uri: str | None, experiment: str) -> None:
    uri = tracking_uri or tracking.default_tracking_uri()
    mlflow = tracking.mlflow_module()
    try:
        mlflow.set_tracking_uri(uri)
        exp_id, run_id, new, linked, missing = log_study(mlflow, doc, files, experiment)
    except Exception as e:  # noqa: BLE001 - tracking is best-effort: the report files are the record
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"warning: could not log the study to MLflow at {uri}: {type(e).__name__}: {first}")
        return
    link = tracking.ui_url(uri, exp_id, run_id)
    print(f"study report: MLflow run {run_id} ({'logged now' if new else 'already there'}) in experiment "
          f"{experiment!r} at {uri}, holding the runs of {len(linked)} experiments as children"
          + (f"; no MLflow run found for {', '.join(missing)}" if missing else "") + (f", {link}" if link else ""))
