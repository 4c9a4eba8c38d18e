"""What a user opens after a run (issue 34): the experiments in one screen (`python -m pipeline exp-show`), in a
pipe as in a terminal, where `dvc exp show` prints only `…`; the MLflow UI on the workspace's store at the
address of its training runs (`python -m pipeline ui`). (`make repro`'s last lines: tests/test_performance.py.)"""

import json
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from helpers import copy_repository, git_env
from tiny import cli

from pipeline.commands import ui
from pipeline.tracking import client as tracking


def data(fid: float, seed: int, sigma_rel, ruler: str = "r1", bpd: float = 3.9) -> dict:
    """One run as `dvc exp show --json` has it (the files the view reads)."""
    return {"timestamp": "2026-12-07T08:00:00", "params": {"params.yaml": {"data": {
        "seed": seed, "data": {"root": f"/data/{seed}"}, "ema": {"sigma_rel": sigma_rel}, "train": {"steps": 1200}}}},
            "metrics": {"metrics/fid.json": {"data": {"best": {"fid": fid, "sampler": "dpmpp", "steps": 20},
                                                      "ruler": ruler, "fid": {"dpmpp": {"20": fid}, "ddim": {"20": fid + 3}}}},
                        "metrics/fid_floor.json": {"data": {"floor": {"fid": 1.29}}},
                        "metrics/nll.json": {"data": {"nll": {"bits_per_dim": bpd}}},
                        "metrics/denoise.json": {"data": {"denoise": {"ema_mse": 0.0433}}}}}


def shown(*experiments, workspace=None) -> list:
    base = {"rev": "a" * 40, "name": "main", "data": data(22.41, 0, None),
            "experiments": [{"name": name, "revs": [{"rev": rev * 40, "name": name, "data": d}]}
                            for name, rev, d in experiments]}
    return [{"rev": "workspace", "name": None, "data": workspace or base["data"]}, base]


def test_the_view_puts_the_best_first_with_what_changed(tmp_path):
    saved = tmp_path / "show.json"
    saved.write_text(json.dumps(shown(("sigma05", "b", data(21.96, 0, 0.05)), ("seed1", "c", data(23.1, 1, None)))))
    r = cli(tmp_path, "exp-show", "--exp-json", str(saved))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:4] == ["experiment", "created", "best", "FID"]
    assert [re.split(r"\s{2,}", line.strip())[0] for line in lines[1:]] == ["*", "main (workspace)", "seed1"]
    best = lines[1]
    assert best.startswith("*") and "sigma05" in best and "21.96" in best and "dpmpp-20" in best
    assert best.rstrip().endswith("seed=0, ema.sigma_rel=0.05")  # what differs; data.root (per machine) does not count
    assert "main (workspace)" in lines[2] and lines[2].rstrip().endswith("seed=0, ema.sigma_rel=null")
    assert "seed1" in lines[3] and "23.1" in lines[3] and "3.900" in lines[3] and "0.0433" in lines[3]
    assert all("\x1b" not in line and "…" not in line for line in lines)  # plain text, nothing cut
    cells = cli(tmp_path, "exp-show", "--exp-json", str(saved), "--cells").output.splitlines()
    assert "FID ddim-20" in cells[0] and "FID dpmpp-20" in cells[0] and "24.96" in cells[1]


def test_fids_of_other_rulers_are_not_the_best(tmp_path):
    saved = tmp_path / "show.json"
    saved.write_text(json.dumps(shown(("other", "b", data(5.0, 0, None, ruler="r2")))))
    lines = cli(tmp_path, "exp-show", "--exp-json", str(saved)).output.splitlines()
    assert lines[0].startswith("warning: these FIDs were measured with 2 rulers")
    assert lines[2].startswith("*") and "main" in lines[2] and "other" in lines[3] and "r2" in lines[3]


def test_experiments_without_their_results_yet_are_named_not_shown(tmp_path):
    """A running experiment's numbers are the workspace's as its stages write them (partial), a queued one has
    none: both are named in a last line, and the workspace is no row while an experiment runs in it."""
    show = shown(("done", "b", data(21.0, 0, 0.05)), ("busy", "c", data(1.0, 0, 0.07)), ("later", "d", data(2.0, 0, 0.1)),
                 workspace=data(1.0, 0, 0.07))
    executors = {"busy": {"state": "running", "name": "workspace"}, "later": {"state": "queued", "name": None}}
    for exp in show[1]["experiments"]:
        exp["executor"] = executors.get(exp["name"])
    saved = tmp_path / "show.json"
    saved.write_text(json.dumps(show))
    lines = cli(tmp_path, "exp-show", "--exp-json", str(saved)).output.splitlines()
    assert [line[3:].split()[0] for line in lines[1:3]] == ["done", "main"] and lines[1].startswith("*")
    assert lines[3] == "(not shown: busy (running), later (queued); `dvc queue status`)" and len(lines) == 4


def test_artifacts_recorded_elsewhere_are_noticed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ui.elsewhere({"artifact_location": (tmp_path / "mlruns/ddpm").as_uri()}) is None
    assert ui.elsewhere({"artifact_location": "file:///srv/old/mlruns/ddpm"}).as_posix() == "/srv/old/mlruns/ddpm"
    assert ui.elsewhere({"artifact_location": "mlflow-artifacts:/1"}) is None


def test_the_runs_link_opens_the_training_runs_with_the_headline_metrics():
    url = tracking.ui_url("http://127.0.0.1:5000", "7")
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                   "&viewStateShareKey=ddpm-pipeline")
    assert tracking.ui_url("http://h:1/", "7", "abc") == "http://h:1/#/experiments/7/runs/abc?workflowType=machine_learning"
    key, value = tracking.runs_view()
    view = json.loads(value)
    state = json.loads(view["state"])
    assert key == "mlflow.sharedViewState.ddpm-pipeline" and view["name"] and isinstance(view["createdAt"], int)
    assert {"metrics.`best.fid`", "metrics.`fid`", "tags.`best.sampler`"} <= set(state["selectedColumns"])
    assert tracking.same_view(tracking.runs_view(created_ms=1)[1], value) and not tracking.same_view(None, value)


@pytest.mark.slow
def test_the_view_read_from_a_pipe_names_the_best_fid(reproduced, tmp_path):
    """In a pipe (stdout not a terminal): `dvc exp show --no-pager` prints only `…` in its cells at 120 columns,
    `python -m pipeline exp-show` the best FID of metrics/fid.json on the line marked *."""
    root = copy_repository(reproduced, tmp_path / "repo")
    env = {**git_env(system_metrics=False), "COLUMNS": "120"}
    best = json.loads((root / "metrics/fid.json").read_text())["best"]
    dvc = subprocess.run(["dvc", "exp", "show", "--no-pager"], cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    assert f"{best['fid']:.4g}" not in dvc.stdout and "…" in dvc.stdout  # DVC's: fitted into the width
    ours = subprocess.run([sys.executable, "-m", "pipeline", "exp-show"], cwd=root, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert ours.returncode == 0, ours.stderr
    (line,) = [line for line in ours.stdout.splitlines() if line.startswith("*")]
    assert f"{best['fid']:.4g}" in line.split() and f"{best['sampler']}-{best['steps']}" in line.split()


@pytest.mark.slow
def test_ui_serves_the_store_at_the_address_of_the_training_runs(reproduced, tmp_path):
    """`python -m pipeline ui` on the store the log stage made: it prints the address of the experiment's runs in
    the model-training view with the saved view of the headline metrics, the server answers there and holds
    that view, and Ctrl-C (SIGINT) stops it."""
    from test_tracking import closed_port

    root = copy_repository(reproduced, tmp_path / "repo")
    port = closed_port()
    env = {**git_env(system_metrics=False), "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:  # until the address (the server answers by then)
            lines.append(line)
            if line.startswith("MLflow UI: ") or len(lines) > 200:
                break
        address = lines[-1].removeprefix("MLflow UI: ").strip()
        exp = ui.experiment_of(f"http://127.0.0.1:{port}", "ddpm")
        assert address == (f"http://127.0.0.1:{port}/#/experiments/{exp['experiment_id']}/runs"
                           "?workflowType=machine_learning&viewStateShareKey=ddpm-pipeline"), lines
        with urllib.request.urlopen(address.split("#")[0], timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert tracking.same_view(tags.get("mlflow.sharedViewState.ddpm-pipeline"), tracking.runs_view()[1])
        assert not any(line.startswith("warning") for line in lines)  # the copy's artifacts are its own
    finally:
        server.send_signal(signal.SIGINT)
        rest = server.communicate(timeout=60)[0]
    assert server.returncode == 0, rest
    with pytest.raises(OSError):  # nothing answers there any more (the server's children stopped with it)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    assert ui.port_free("127.0.0.1", port)


def declared_outputs() -> set[str]:
    """Every output dvc.yaml declares under reports/ and plots/ (outs, metrics and plots of every stage)."""
    import yaml
    from helpers import REPO

    found = set()
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("outs", []) + stage.get("plots", []) + stage.get("metrics", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            if path.split("/")[0] in ("reports", "plots"):
                found.add(path)
    return found


def test_the_parent_run_holds_the_declared_outputs_and_nothing_else():
    from pipeline.tracking.runs import PARENT_ARTIFACTS

    # report.md: its images are relative links MLflow does not show; the preview grids are train's run's
    assert set(PARENT_ARTIFACTS) == declared_outputs() - {"reports/report.md", "plots/train_samples"}


@pytest.mark.slow  # a fresh MLflow database and a whole log stage: 10-20 s
def test_log_sends_headline_metrics_same_named_cells_and_no_stray_files(tmp_path, monkeypatch):
    """The parent's Model metrics hold what measures the run (counts and seconds are tags), its artifacts only the
    stages' outputs (not a study's report left in reports/), every cell's grid is grid.png (Compare shows two side
    by side), the descriptions show the best cell's grid and train's last preview, the experiment has the runs
    table's saved view."""
    import mlflow
    from PIL import Image
    from test_tracking import finished_workspace

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_TRACKING_URI", "DVC_EXP_NAME"):  # as found afterwards (the stage sets MLflow's retry defaults)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    root = finished_workspace(tmp_path / "ws")
    (root / "reports/report.html").write_text("<html></html>")
    (root / "reports/study-papers.md").write_text("# a study of another commit\n")
    (root / "plots/stray.csv").write_text("x\n1\n")
    (root / "metrics/fid_floor.json").write_text(json.dumps({"floor": {"fid": 1.3, "num_images": 4, "kid_mean": 0.0}}))
    (root / "plots/train_samples").mkdir()
    Image.new("L", (8, 8)).save(root / "plots/train_samples/step_0000006.png")
    r = cli(root, "log", env={"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"})
    assert r.exit_code == 0 and "MLflow run" in r.output, r.output
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("ddpm")
    assert tracking.same_view(exp.tags.get("mlflow.sharedViewState.ddpm-pipeline"), tracking.runs_view()[1])
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs["workspace"]
    # (best.fid and train.final_loss go to the logged model too, when there is one: not here, no checkpoint)
    assert {"best.fid", "fid.ddpm.2", "floor.fid", "train.final_loss", "classifier.test_accuracy"} <= set(
        parent.data.metrics)
    assert not {"train.final_step", "train.parameters", "classifier.final_loss", "floor.num_images",
                "floor.kid_mean"} & set(parent.data.metrics)
    assert parent.data.tags["floor.num_images"] == "4" and parent.data.tags["train.parameters"] == "100"
    logged = {f.path for folder in ("reports", "plots") for f in client.list_artifacts(parent.info.run_id, folder)}
    assert logged == {"reports/report.html", "plots/train_loss.csv"}
    cell = runs["sample/ddpm-2"]
    assert [a.path for a in client.list_artifacts(cell.info.run_id)] == ["grid.png"]
    assert set(cell.data.metrics) <= {"fid", "kid_mean", "kid_std", "precision", "recall", "isc_mean", "isc_std",
                                      "class_accuracy"} | {k for k in cell.data.metrics if k.startswith("system/")}
    assert cell.data.metrics["fid"] == 11.0 and cell.data.tags["num_samples"] == "4"
    assert f"get-artifact?path=grid.png&run_uuid={cell.info.run_id}" in parent.data.tags["mlflow.note.content"]
    train = runs["train"]
    (image,) = [f.path for f in client.list_artifacts(train.info.run_id, "images") if f.path.endswith(".png")]
    assert "preview at step 6" in train.data.tags["mlflow.note.content"]
    assert urllib.parse.quote(image, safe="") in train.data.tags["mlflow.note.content"]


def test_plots_that_misled_no_longer_do(monkeypatch):
    """The study's panels share one FID axis; DVC's FID-vs-steps axis spans the steps run (not Vega's rounded
    1-100), FID vs σ_rel is ordinal (one experiment: one value) and says so, bits/dim per timestep is on a log axis
    (t = 0 flattened the rest)."""
    from pathlib import Path

    import yaml
    from helpers import REPO

    from pipeline.rendering import figures

    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.append(fig))
    panels = [{"name": name, "n": 3, "lines": {"ddpm": [(10, f, 1.0), (20, f - 2, 1.0)]}}
              for name, f in (("baseline", 30.0), ("cosine", 128.0))]
    figures.plot_study(panels, Path("unused.png"))
    a, b = drawn[0].axes
    assert a.get_ylim() == b.get_ylim() and a.get_ylim()[0] < 30 and a.get_ylim()[1] > 128
    templates = {p.stem: json.loads(p.read_text()) for p in (REPO / ".dvc/plots").glob("*.json")}
    x = templates["fid_by_sampler"]["encoding"]["x"]["scale"]
    assert x["type"] == "log" and x["nice"] is False
    assert templates["fid_vs_sigma_rel"]["encoding"]["x"]["type"] == "ordinal"
    assert "dvc plots diff" in templates["fid_vs_sigma_rel"]["title"]["subtitle"]
    assert templates["nll_terms"]["encoding"]["y"]["scale"]["type"] == "log"
    nll = next(p for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["nll"]["plots"]
               if "plots/nll_terms.csv" in p)
    assert nll["plots/nll_terms.csv"]["template"] == "nll_terms"
