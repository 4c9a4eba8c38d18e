"""Stage `log`: send one pipeline run to MLflow (``pipeline.tracking.runs``).

One parent run per pipeline run (named and tagged with the DVC experiment name and the git
revision) holding every param, the summary metrics (the DVC metrics under the names `dvc exp
show` gives them: ``best.fid``, ``fid.<sampler>.<steps>``, ``floor.fid``, ``nll.bits_per_dim``,
``denoise.ema_mse``, …), the best cell as tags, a description saying what ran and what came out,
the test split as its evaluation data set, and the report; child runs for `train` (its own live
run, attached, or a new one made from its files), `classifier`, and one per sampler × steps (×
guidance) cell. The EMA model is logged in train's run and registered as a new version of the
model (``pipeline.tracking.registry``).

The stage reads only files the other stages wrote, and runs on every `dvc repro` / `dvc exp run`
(always_changed), so experiments restored from the run-cache are logged too; a run already
logged is not logged twice, and a `log` that was cut off is tidied up by the next
(``pipeline.tracking.tidy``). If the tracking server cannot be reached the stage warns and
succeeds (the DVC metrics are already written) after a few seconds, and the run waits in the
outbox (``pipeline.tracking.outbox``) for ``python -m pipeline sync``.
"""

from pathlib import Path

import typer

from pipeline.params.schema import load_params, to_flat_dict
from pipeline.stages._cli import PARAMS, stage, stage_app
from pipeline.tracking import client as tracking
from pipeline.tracking.outbox import entries, flush, outbox, stash
from pipeline.tracking.runs import collect, fingerprint, publish
from pipeline.workspace import experiment_name, git_revision

KEYS = ["params.yaml:"]  # all of it

app = stage_app()


@app.command()
@stage
def main(params: Path = PARAMS,
         tracking_uri: str = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                          help="default: sqlite:///<repo root>/mlflow.db"),
         experiment: str = typer.Option("ddpm", envvar="MLFLOW_EXPERIMENT_NAME",
                                        help="MLflow experiment name (and registered model)")):
    """Log this pipeline run to MLflow: params, metrics, loss curve, grids, plots, the model."""
    p = load_params(params)
    run = collect(p)
    if run["fid"] is None:
        raise FileNotFoundError("metrics/fid.json does not exist: run the report stage first")
    exp_name, revision = experiment_name(), git_revision()
    fp = fingerprint(to_flat_dict(p), run, exp_name, revision)
    uri = tracking_uri or tracking.default_tracking_uri()
    meta = {"fingerprint": fp, "exp_name": exp_name, "revision": revision, "experiment": experiment,
            "tracking_uri": uri}
    mlflow = tracking.mlflow_module()
    try:
        mlflow.set_tracking_uri(uri)
        message = publish(mlflow, experiment, params, meta)
    except Exception as e:  # tracking is best-effort: the DVC metrics are the record
        entry = stash(params, meta)
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


if __name__ == "__main__":
    app()
