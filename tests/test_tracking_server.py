"""`log` and `sync` against a real `mlflow server` (sqlite backend, 127.0.0.1, a free port):
a normal log; the server stopped in the middle of a log and started again, then `sync`;
two experiments logging at once; and `log` killed with SIGKILL at several points, after
which the next `log` leaves exactly one complete parent run and nothing RUNNING."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_tracking import FINGERPRINT, closed_port, finished_workspace
from tiny import cli, errors, python, subprocess_env

# a real `mlflow server` subprocess and `log` subprocesses: out of `make test-fast`
pytestmark = pytest.mark.slow

CHILDREN = {"train", "classifier", "sample/ddpm-2", "sample/ddpm-3", "sample/ddim-2", "sample/ddim-3"}


def workspace(root: Path) -> Path:
    """What the stages before `log` write, for the samplers ddpm and ddim at 2 and 3 steps."""
    finished_workspace(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"]["samplers"] = ["ddpm", "ddim"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


class Server:
    """``mlflow server`` as a subprocess: bounded waits, always stopped at teardown."""

    def __init__(self, root: Path):
        self.root, self.port = root, closed_port()
        self.db = root / "srv.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        with open(self.root / "server.log", "ab") as log:
            # no GenAI job runner (huey consumers), as `python -m pipeline ui` starts it: tracking needs none
            env = {**subprocess_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def runs(self, experiment: str, deleted: bool = False) -> list:
        """Active (or deleted) runs of ``experiment``."""
        import mlflow
        from mlflow.entities import ViewType

        client = mlflow.MlflowClient(self.uri)
        exp = client.get_experiment_by_name(experiment)
        view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
        return client.search_runs([exp.experiment_id], run_view_type=view, max_results=1000) if exp else []

    def logging_since(self, experiment: str, since_ms: int) -> tuple[int, bool]:
        """(runs of ``experiment`` a `log` opened since ``since_ms``, whether a parent is complete),
        read from the server's database."""
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=2) as con:
                exp = "SELECT experiment_id FROM experiments WHERE name = ?"
                n = con.execute(f"SELECT count(*) FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                                f"WHERE t.key = 'pipeline.logging' AND r.lifecycle_stage = 'active' "
                                f"AND r.start_time >= ? AND r.experiment_id IN ({exp})",
                                (since_ms, experiment)).fetchone()[0]
                done = con.execute(f"SELECT count(*) FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                                   f"WHERE t.key = ? AND r.start_time >= ? AND r.experiment_id IN ({exp})",
                                   (FINGERPRINT, since_ms, experiment)).fetchone()[0]
        except sqlite3.OperationalError:  # locked by the server's write, or no tables yet
            return 0, False
        return n, done > 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    """Leave the process environment as found (the stage sets MLflow's retry defaults)."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def start_log(root: Path, uri: str, exp_name: str, experiment: str) -> subprocess.Popen:
    return subprocess.Popen(python("-m", "pipeline", "log", "--experiment", experiment, "--tracking-uri", uri),
                            cwd=root, env=subprocess_env(DVC_EXP_NAME=exp_name),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_one_complete_run(server: Server, experiment: str, exp_name: str):
    """Exactly one parent run for the pipeline run ``exp_name``, FINISHED, with every child
    FINISHED and its data; nothing of ``experiment`` left RUNNING. Returns the parent."""
    runs = server.runs(experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags["dvc.exp_name"] == exp_name]
    assert len(parents) == 1, [(r.info.run_id, r.info.status, r.data.tags.get(FINGERPRINT)) for r in parents]
    (parent,) = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags[FINGERPRINT] and parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == sorted(CHILDREN)
    assert all(r.info.status == "FINISHED" for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert parent.data.metrics["best.fid"] == 9.0 and parent.data.params["train.steps"] == "6"
    import mlflow

    client = mlflow.MlflowClient(server.uri)
    (train,) = [r for r in children if r.info.run_name == "train"]
    assert [m.value for m in client.get_metric_history(train.info.run_id, "loss")] == [0.9, 0.7, 0.5]
    cell = next(r for r in children if r.info.run_name == "sample/ddim-3")
    assert "grid.png" in [a.path for a in client.list_artifacts(cell.info.run_id)]
    return parent


def test_log_to_a_running_server(server, tmp_path):
    root = workspace(tmp_path)
    result = cli(root, "log", env={"MLFLOW_TRACKING_URI": server.uri})
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert f"at {server.uri}" in result.stdout
    check_one_complete_run(server, "ddpm", "workspace")
    again = cli(root, "log", env={"MLFLOW_TRACKING_URI": server.uri})
    assert again.exit_code == 0 and "already in MLflow" in again.stdout, again.output
    assert not (root / ".mlflow-outbox").exists() or not list((root / ".mlflow-outbox").iterdir())
    check_one_complete_run(server, "ddpm", "workspace")


def test_server_stopped_mid_log_then_restarted_and_synced(server, tmp_path, figure):
    root = workspace(tmp_path)
    experiment = "stopped"
    since = int(time.time() * 1000)
    proc = start_log(root, server.uri, "cut-off", experiment)
    deadline = time.monotonic() + 120
    while server.logging_since(experiment, since)[0] < 2:  # the parent and the first child are open
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    try:
        assert not server.logging_since(experiment, since)[1], "the log finished before the server was stopped"
        server.stop(signal.SIGKILL)  # as a crash would
    finally:
        proc.send_signal(signal.SIGCONT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and f"warning: could not log to MLflow at {server.uri}" in out, out
    # while it is down, another experiment's log waits in the outbox too
    down = cli(root, "log", "--experiment", experiment, env={"MLFLOW_TRACKING_URI": server.uri,
                                                               "DVC_EXP_NAME": "while-down"})
    assert down.exit_code == 0 and "warning: could not log" in down.stdout, down.output
    assert len(list((root / ".mlflow-outbox").glob("*/meta.json"))) == 2

    server.start()
    synced = cli(root, "sync")
    assert synced.exit_code == 0 and "sync: 2 run(s) logged" in synced.stdout, synced.output
    assert not list((root / ".mlflow-outbox").glob("*/meta.json"))
    for name in ("cut-off", "while-down"):
        check_one_complete_run(server, experiment, name)
    # what the cut-off log had opened is marked FAILED and deleted, not left RUNNING
    deleted = server.runs(experiment, deleted=True)
    assert deleted and all(r.data.tags.get("pipeline.aborted") for r in deleted)
    assert [r.info.status for r in deleted if "mlflow.parentRunId" not in r.data.tags] == ["FAILED"]
    figure("real MLflow server: 2 runs logged while it was stopped (one cut off mid-log) and started, "
           "both complete after `sync`, nothing lost or doubled")


def test_two_experiments_log_at_once(server, tmp_path):
    roots = [workspace(tmp_path / name) for name in ("a", "b")]  # two repositories, two locks
    procs = [start_log(root, server.uri, f"together-{root.name}", "together") for root in roots]
    for p in procs:
        out = p.communicate(timeout=180)[0]
        assert p.returncode == 0 and "warning" not in out and "Traceback" not in out, out
    for root in roots:
        check_one_complete_run(server, "together", f"together-{root.name}")


def test_killed_log_is_tidied_by_the_next(server, tmp_path, figure):
    """SIGKILL once the n-th run of an attempt is open, for several n; the next attempt marks
    the cut-off runs FAILED and deletes them, and logs the pipeline run once, in full."""
    root = workspace(tmp_path)
    experiment, killed = "killed", []
    for n in (1, 2, 4, 7):  # parent only; + train; + classifier and a cell; all runs, before the fingerprint
        since = int(time.time() * 1000)
        proc = start_log(root, server.uri, "kill", experiment)
        deadline = time.monotonic() + 120
        while proc.poll() is None and server.logging_since(experiment, since)[0] < n:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if proc.poll() is None:
            proc.kill()  # kill -9
            killed.append(n)
        proc.communicate(timeout=60)
    assert len(killed) >= 3, f"only {len(killed)} of the logs were still running when killed"
    result = cli(root, "log", "--experiment", experiment, env={"MLFLOW_TRACKING_URI": server.uri,
                                                                 "DVC_EXP_NAME": "kill"})
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    check_one_complete_run(server, experiment, "kill")
    deleted = server.runs(experiment, deleted=True)
    assert all(r.info.status != "RUNNING" for r in deleted)
    figure(f"kill -9 of `log` against a real MLflow server: {len(killed)} kills survived "
           f"(after {', '.join(map(str, killed))} runs were opened), one complete parent run after the next `log`")


def test_complete_run_left_running_is_finished(server, tmp_path):
    """A log killed after it tagged the parent complete but before it closed the runs."""
    root = workspace(tmp_path)
    assert cli(root, "log", "--experiment", "unclosed", env={"MLFLOW_TRACKING_URI": server.uri}).exit_code == 0
    import mlflow

    client = mlflow.MlflowClient(server.uri)
    for run in server.runs("unclosed"):
        client.update_run(run.info.run_id, status="RUNNING")  # the state such a kill leaves
    again = cli(root, "log", "--experiment", "unclosed", env={"MLFLOW_TRACKING_URI": server.uri})
    assert again.exit_code == 0 and "already in MLflow" in again.stdout, again.output
    check_one_complete_run(server, "unclosed", "workspace")


def test_sync_of_an_entry_without_target(tmp_path):
    """Entries written before the outbox recorded tracking URIs go nowhere by accident."""
    root = workspace(tmp_path)
    entry = root / ".mlflow-outbox" / "0123456789abcdef"
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text('{"fingerprint": "0123456789abcdef", "experiment": "ddpm"}')
    result = cli(root, "sync")
    assert result.exit_code == 1 and len(errors(result)) == 1 and "--to" in errors(result)[0], result.output
    assert (entry / "meta.json").is_file()
