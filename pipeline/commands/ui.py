"""Command `ui` (not a DVC stage): MLflow's UI on this workspace's runs, and the address that opens it
on them.

A plain ``mlflow ui`` prints ``http://127.0.0.1:5000``, and MLflow 3.17's UI opens that in its GenAI
view (an assistant panel, traces, "Evaluations"), whatever the experiment's type: it takes its view
from the ``workflowType`` URL parameter or from the sidebar's switch kept in the browser
(``pipeline.tracking.client``). This starts ``mlflow ui`` on the workspace's store (the
``sqlite:///<repo root>/mlflow.db`` the pipeline logs to, or ``MLFLOW_TRACKING_URI``), waits until
it answers, makes sure the experiment has the runs table's saved view of the headline metrics
(``client.RUNS_VIEW``), and prints the address of the experiment's training runs in the
model-training view with that view (``client.ui_url``); Ctrl-C stops the server. With an HTTP
tracking URI (a server already) it only prints the address.

MLflow keeps absolute artifact locations for a local store (its ``resolve_uri_if_local``): a moved
or copied workspace's store still points at the artifacts of the old place, so the runs and
metrics show and the artifacts do not. A warning says so when the experiment's artifacts are
not in this workspace.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import typer

from ddpm.errors import InputError
from pipeline.errors import ExternalError
from pipeline.stages._cli import one_line, stage_app
from pipeline.tracking import client as tracking
from pipeline.workspace import repo_root

START_SECONDS = 180  # for the server to answer (about 20 s on a busy 2-core machine)

app = stage_app()


@app.command("ui")
def ui(port: int = typer.Option(5000, help="the port of the UI"),
       host: str = typer.Option("127.0.0.1", help="the address it listens on (0.0.0.0: every interface)"),
       tracking_uri: str = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                        help="the store (default: sqlite:///<repo root>/mlflow.db); an http(s) URI "
                                             "is a server already: its address is printed, nothing started"),
       experiment: str = typer.Option("ddpm", envvar="MLFLOW_EXPERIMENT_NAME", help="the MLflow experiment")):
    """Start MLflow's UI on this workspace's runs and print the address of its training-runs view (the headline
    metrics as columns); Ctrl-C stops it. Not a DVC stage."""
    one_line(main)(port, host, tracking_uri, experiment)


def api(base: str, path: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API at ``base``; its JSON answer."""
    request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def experiment_of(base: str, name: str) -> dict | None:
    """The experiment ``name`` of the server at ``base`` (its REST record), None when it has none of that name."""
    try:
        return api(base, f"experiments/get-by-name?experiment_name={urllib.parse.quote(name)}")["experiment"]
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def with_runs_view(base: str, exp: dict) -> None:
    """Give the experiment the runs table's saved view (``client.RUNS_VIEW``) unless it has it."""
    key, value = tracking.runs_view()
    if not tracking.same_view({t["key"]: t["value"] for t in exp.get("tags", [])}.get(key), value):
        api(base, "experiments/set-experiment-tag", {"experiment_id": exp["experiment_id"], "key": key, "value": value})


def address(base: str, exp: dict | None) -> str:
    """The page to open: the experiment's training runs (the model-training view, the saved view), or the list of
    experiments in that view when there is no such experiment yet."""
    if exp is None:
        return f"{base.rstrip('/')}/#/experiments?{tracking.UI_VIEW}"
    return tracking.ui_url(base, exp["experiment_id"])


def elsewhere(exp: dict | None) -> Path | None:
    """The folder of the experiment's artifacts when it is a local one outside this workspace (moved or copied)."""
    location = (exp or {}).get("artifact_location", "")
    if not location.startswith("file://"):
        return None
    folder = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    root = repo_root()
    return None if folder == root or root in folder.parents else folder


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on host:port (SO_REUSEADDR, as the server binds: the closed connections of a server
    stopped a moment ago do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start(uri: str, host: str, port: int, log) -> subprocess.Popen:
    """``mlflow ui`` on ``uri`` at host:port (its output to ``log``), answering: /health says OK."""
    # without MLflow's GenAI job runner (seven huey consumer processes of about 200 MB each, seen on a 2-core
    # machine) unless the user turns it on: the runs, their metrics and artifacts need none of it
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
                               "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + START_SECONDS
    try:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                raise ExternalError(f"mlflow ui stopped (exit status {server.returncode}): {' / '.join(tail)}")
            try:
                with urllib.request.urlopen(f"http://{local}:{port}/health", timeout=2):
                    return server
            except OSError:
                time.sleep(0.5)
        raise ExternalError(f"mlflow ui did not answer within {START_SECONDS} s")
    except BaseException:  # not answering, or Ctrl-C while it starts: nothing is left running
        stop(server)
        raise


def stop(server: subprocess.Popen) -> None:
    """Stop the server (SIGTERM: mlflow ui stops its children too), killed after 30 s."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(port: int, host: str, tracking_uri: str | None, experiment: str) -> None:
    uri = tracking_uri or tracking.default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI (a server already): {address(uri, experiment_of(uri, experiment))}", flush=True)
        return
    if not uri.startswith("sqlite:///"):
        raise InputError(f"tracking URI {uri!r}: `ui` serves a sqlite:/// store or prints an http(s) server's address")
    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if not db.is_file():
        raise InputError(f"{db} does not exist yet: the log stage makes it (make repro, dvc repro)")
    if not port_free(host, port):
        raise InputError(f"port {port} on {host} is in use (another MLflow UI?): choose one with --port")
    # Ctrl-C (SIGINT) and SIGTERM stop the server: Python's SIGINT handler even where this process was started with
    # SIGINT ignored (a child of a pytest-xdist worker), and the server's own children go with it (mlflow ui
    # stops its uvicorn and job runners on SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryFile() as log:
        server = start(uri, host, port, log)
        try:
            base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
            exp = experiment_of(base, experiment)
            if exp is not None:
                with_runs_view(base, exp)
            print(f"MLflow UI: {address(base, exp)}", flush=True)
            if exp is None:
                print(f"(no experiment {experiment!r} in {db} yet: the log stage makes it)", flush=True)
            if (old := elsewhere(exp)) is not None:
                print(f"warning: the runs' artifacts are recorded at {old}, not in this workspace (moved or copied?): "
                      "the UI shows runs and metrics, not their artifacts (MLflow stores absolute artifact paths for "
                      "a local store)", flush=True)
            print("(Ctrl-C stops it)", flush=True)
            server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop(server)
