"""MLflow tracking must never cost results: a dead server leaves the run in the outbox
(the stage still succeeds within seconds), `pipeline sync` logs it exactly once, to the
server it was meant for unless told otherwise (`--to`), and parallel first use of a fresh
sqlite database neither crashes nor duplicates runs. (A real `mlflow server` and killed
`log` processes: tests/test_tracking_server.py.)"""

import json
import socket
import subprocess
import time

import pytest
from PIL import Image
from tiny import cli, errors, python, subprocess_env, workspace

FINGERPRINT = "pipeline.fingerprint"


def finished_workspace(root):
    """A workspace holding what the stages before `log` write (tiny, made up)."""
    workspace(root)
    files = {"metrics/train.json": {"train": {"final_loss": 0.5, "final_step": 6, "parameters": 100}},
             "metrics/classifier.json": {"classifier": {"test_accuracy": 0.9, "final_loss": 0.2}},
             "logs/train_timing.json": {"seconds": 1.0, "images_per_second": 48.0},
             "metrics/fid.json": {"best": {"fid": 9.0, "sampler": "ddpm", "steps": 2}, "fid": {"ddpm": {"2": 9.0}}}}
    for s in ("ddpm", "ddim"):
        for k in (2, 3):
            files[f"metrics/cells/{s}-{k}.json"] = {"fid": 9.0 + k, "kid_mean": 0.1, "extractor": "x", "num_samples": 4}
            files[f"samples/{s}-{k}/info.json"] = {"seconds": 0.5, "images_per_second": 8.0}
            Image.new("L", (8, 8)).save((root / f"samples/{s}-{k}").mkdir(parents=True) or root / f"samples/{s}-{k}/grid.png")
    for name, obj in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(obj))
    (root / "plots").mkdir()
    (root / "plots/train_loss.csv").write_text("step,loss\n2,0.9\n4,0.7\n6,0.5\n")
    (root / "reports").mkdir()
    (root / "reports/report.md").write_text("# FID\n")
    return root


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent_runs(uri: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("ddpm")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


@pytest.fixture
def mlflow_env(monkeypatch):
    """Leave the process environment as found (the stage sets MLflow's retry defaults)."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def test_http_defaults_are_read_by_mlflow(mlflow_env):
    """MLflow reads its HTTP retry settings as integers: a default it cannot parse (a backoff
    factor of "0.5") made every HTTP request raise ValueError before it reached the server."""
    from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                              MLFLOW_HTTP_REQUEST_TIMEOUT)
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    from pipeline.tracking.client import http_defaults

    http_defaults()
    values = [v.get() for v in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
                                MLFLOW_HTTP_REQUEST_TIMEOUT)]
    assert all(isinstance(v, int) and v >= 0 for v in values), values
    assert values[0] <= 2 and values[2] <= 30  # gives up within seconds, not MLflow's minutes
    # a request to nothing fails as a connection failure, after the retries
    with pytest.raises(MlflowException, match="127.0.0.1"):
        http_request(MlflowHostCreds(f"http://127.0.0.1:{closed_port()}"), "/health", "GET")


def test_dead_server_then_sync_logs_once(tmp_path, mlflow_env):
    root = finished_workspace(tmp_path)
    dead = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    result = cli(root, "log", env={"MLFLOW_TRACKING_URI": dead})
    took = time.monotonic() - start
    print(f"log against a dead server: {took:.1f} s")
    assert result.exit_code == 0, result.output
    assert f"warning: could not log to MLflow at {dead}" in result.stdout
    assert took < 30, f"log against a dead server took {took:.1f} s"
    waiting = list((root / ".mlflow-outbox").glob("*/meta.json"))
    assert len(waiting) == 1 and (waiting[0].parent / "samples/ddim-3/grid.png").is_file()
    fp = json.loads(waiting[0].read_text())["fingerprint"]
    assert (root / "metrics/fid.json").is_file()

    assert json.loads(waiting[0].read_text())["tracking_uri"] == dead

    # still down: sync fails in one line, and keeps the run
    down = cli(root, "sync")
    assert down.exit_code == 1 and len(errors(down)) == 1 and "1 run(s) still in" in errors(down)[0]
    assert dead in errors(down)[0]

    # a `log` to another tracking URI leaves it alone; `sync --to` moves it on purpose
    live = f"sqlite:///{root / 'tracking' / 'mlflow.db'}"
    (root / "tracking").mkdir()
    elsewhere = cli(root, "log", env={"MLFLOW_TRACKING_URI": live, "DVC_EXP_NAME": "elsewhere"})
    assert elsewhere.exit_code == 0 and "1 run(s) in" in elsewhere.stdout and "wait for other tracking URIs" \
        in elsewhere.stdout, elsewhere.output
    assert len(list((root / ".mlflow-outbox").glob("*/meta.json"))) == 1
    assert [r.data.tags["dvc.exp_name"] for r in parent_runs(live)] == ["elsewhere"]
    synced = cli(root, "sync", "--to", live)
    assert synced.exit_code == 0, synced.output
    assert "sync: 1 run(s) logged" in synced.stdout
    assert not list((root / ".mlflow-outbox").glob("*/meta.json"))
    (run,) = [r for r in parent_runs(live) if r.data.tags["dvc.exp_name"] == "workspace"]
    assert run.data.tags[FINGERPRINT] == fp
    assert run.data.metrics["best.fid"] == 9.0 and run.data.params["train.steps"] == "6"

    again = cli(root, "sync")
    assert again.exit_code == 0 and "sync: 0 run(s) logged" in again.stdout
    relog = cli(root, "log", env={"MLFLOW_TRACKING_URI": live})
    assert relog.exit_code == 0 and "already in MLflow" in relog.stdout
    assert len(parent_runs(live)) == 2


@pytest.mark.slow
def test_parallel_first_use_of_a_fresh_database(tmp_path):
    root = finished_workspace(tmp_path)
    names = ["exp-a", "exp-a", "exp-b"]  # two stages logging the same run, one another run
    procs = [subprocess.Popen(python("-m", "pipeline", "log"), cwd=root, env=subprocess_env(DVC_EXP_NAME=name),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in names]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "warning" not in out and "Traceback" not in out, out
    runs = parent_runs(f"sqlite:///{root / 'mlflow.db'}")
    by_exp = sorted((r.data.tags["dvc.exp_name"], r.data.tags[FINGERPRINT]) for r in runs)
    assert [e for e, _ in by_exp] == ["exp-a", "exp-b"] and by_exp[0][1] != by_exp[1][1]
    assert sum("already in MLflow" in out for out in outputs) == 1
