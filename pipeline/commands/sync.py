"""Command `sync` (not a DVC stage): log the runs waiting in the outbox (``pipeline.tracking.outbox``),
each to the tracking URI it was meant for, or all to ``--to``."""

import json

import typer

from pipeline.errors import ExternalError, OutputError
from pipeline.stages._cli import one_line, stage_app
from pipeline.tracking import client as tracking
from pipeline.tracking.outbox import _remove_leftovers, entries, flush, outbox

app = stage_app()


@app.command()
def sync(to: str = typer.Option(None, "--to", help="log every waiting run to this tracking URI instead of the one "
                                                  "it was meant for")):
    """Log the runs the log stage could not reach MLflow for (kept in .mlflow-outbox/), each to the tracking URI it
    was meant for (or all to --to); not a DVC stage."""
    one_line(send)(to)


def send(to: str | None = None) -> None:
    """Log the runs waiting in the outbox, each to the tracking URI it was meant for, or all to
    ``to``; fails (one line) when some cannot be logged."""
    mlflow = tracking.mlflow_module()
    if outbox().is_dir():
        with tracking.lock():
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
