"""Check the MLflow UI in a real browser: start `mlflow ui` on 127.0.0.1, open the
pipeline's runs in headless Chromium, and confirm that runs, params, metrics, system
metrics and images appear; save screenshots.

    python scripts/mlflow_ui_check.py [--backend-store-uri sqlite:///mlflow.db] [--out /tmp/mlflow-ui]

Exit status 0 when every check passed, 1 otherwise (each check is printed), 2 when
Chromium is not installed (`apt-get install chromium`). Needs no network.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--window-size=1500,1100"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def browse(chromium: str, url: str, screenshot: Path | None = None, budget_ms: int = 20000) -> str:
    """The DOM after the page's scripts ran (and a screenshot when asked)."""
    with tempfile.TemporaryDirectory() as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
        out = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
        if screenshot is not None:  # second: the server has answered these requests once (charts draw in time)
            subprocess.run([chromium, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    return out.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend-store-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    ap.add_argument("--experiment", default="ddpm")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "mlflow-ui")
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("chromium is not installed (apt-get install chromium): skipping the browser check")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", args.backend_store_uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=open(args.out / "server.log", "w"), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    failures = []

    def check(ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            print(f"mlflow ui did not start: see {args.out / 'server.log'}")
            return 1
        exp = api(base, f"experiments/get-by-name?experiment_name={args.experiment}")["experiment"]
        runs = api(base, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 500}).get("runs", [])
        parents = [r for r in runs if "mlflow.parentRunId" not in {t["key"] for t in r["data"].get("tags", [])}]
        check(bool(parents), f"{len(parents)} parent runs, {len(runs) - len(parents)} child runs in experiment "
                             f"{args.experiment!r}")
        eid = exp["experiment_id"]

        dom = browse(chromium, f"{base}/#/experiments/{eid}/runs?workflowType=machine_learning"
                               "&viewStateShareKey=ddpm-pipeline", args.out / "experiment.png")
        for r in parents:
            check(r["info"]["run_name"] in dom, f"experiment page lists run {r['info']['run_name']!r}")

        for i, parent in enumerate(parents):
            rid, name = parent["info"]["run_id"], parent["info"]["run_name"]
            dom = browse(chromium, f"{base}/#/experiments/{eid}/runs/{rid}?workflowType=machine_learning",
                         args.out / f"run-{i}.png")
            params = [p["key"] for p in parent["data"].get("params", [])]
            metrics = [m["key"] for m in parent["data"].get("metrics", [])]
            check("schedule" in params and "schedule" in dom, f"run {name!r}: param 'schedule' shown")
            best = next((m for m in metrics if m.startswith("best.fid")), metrics[0] if metrics else "")
            check(bool(best) and best in dom, f"run {name!r}: metric {best!r} shown")
            children = [r for r in runs if {"key": "mlflow.parentRunId", "value": rid} in r["data"].get("tags", [])]
            train = next((c for c in children if c["info"]["run_name"] == "train"), None)
            system = [m["key"] for m in (train or {"data": {}})["data"].get("metrics", []) if m["key"].startswith("system/")]
            check(bool(system), f"run {name!r}: the train child run holds system metrics ({len(system)} series)")
            if system:
                tid = train["info"]["run_id"]
                dom = browse(chromium, f"{base}/#/experiments/{eid}/runs/{tid}/system-metrics"
                                       "?workflowType=machine_learning",
                             args.out / f"system-metrics-{i}.png", budget_ms=60000)  # time for the charts to draw
                check("cpu_utilization_percentage" in dom, f"run {name!r}: the train run's System metrics tab shows "
                                                           "cpu_utilization_percentage")
            cell = next((c for c in children if c["info"]["run_name"].startswith("sample/")), None)
            check(cell is not None, f"run {name!r}: has per-cell child runs ({len(children)} children)")
            if cell is None:
                continue
            cid, cname = cell["info"]["run_id"], cell["info"]["run_name"].split("/", 1)[1]
            url = f"{base}/#/experiments/{eid}/runs/{cid}/artifacts/grid.png?workflowType=machine_learning"
            dom = browse(chromium, url, args.out / f"grid-{i}.png")
            check("grid.png" in dom and "<img" in dom, f"run {name!r}: sample grid image of {cname} shown")
            for kind in ("strip", "grid"):
                path = f"{kind}.png"
                with urllib.request.urlopen(f"{base}/get-artifact?path={path}&run_uuid={cid}", timeout=30) as r:
                    check(r.read(8) == b"\x89PNG\r\n\x1a\n", f"run {name!r}: {path} served as a PNG")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"screenshots in {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
