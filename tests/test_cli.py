"""Every stage command through Typer's runner, on tiny synthetic data, in a temp folder."""

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import tiny_params
from ddpm.data import load_split
from pipeline.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, idx_dir):
    """Runs prepare → classifier → train → ema → sample → fid → report once for the module."""
    wd = tmp_path_factory.mktemp("cli")
    p = tiny_params(idx_dir)
    p["train"]["sample_every"] = 1000  # the preview grids, as params.yaml has them
    (wd / "params.yaml").write_text(yaml.safe_dump(p))
    mp = pytest.MonkeyPatch()
    mp.chdir(wd)
    for args in (["prepare"], ["classifier", "--device", "cpu"], ["train", "--device", "cpu"], ["ema"],
                 ["sample", "--sampler", "ddpm", "--steps", 2, "--out", "samples/ddpm-2"],
                 ["sample", "--sampler", "ddim", "--steps", 3, "--out", "samples/ddim-3"]):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
    yield wd
    mp.undo()


def test_prepare_classifier_train_outputs(workdir):
    info = json.loads((workdir / "data/prepared/info.json").read_text())
    assert info["train"] == {"num_images": 256, "shape": [1, 28, 28]}
    acc = json.loads((workdir / "metrics/classifier.json").read_text())["classifier"]["test_accuracy"]
    assert 0.0 <= acc <= 1.0
    train = json.loads((workdir / "metrics/train.json").read_text())["train"]
    assert train["final_step"] == 6
    lines = (workdir / "plots/train_loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,grad_norm" and len(lines) == 1 + 3  # log_every=2
    steps, lrs, norms = zip(*[(int(r[0]), float(r[2]), float(r[3])) for r in (line.split(",") for line in lines[1:])])
    assert steps == (2, 4, 6) and all(n > 0 for n in norms)
    # the learning rate from step 1: warm-up over 2 steps, step 1 at half the lr, step 2 on at the full lr
    lr = tiny_params(workdir)["train"]["lr"]
    assert lrs == pytest.approx((lr, lr, lr))
    rates = [line.split(",") for line in (workdir / "plots/train_lr.csv").read_text().splitlines()[1:]]
    assert [int(s) for s, _ in rates] == [1, 2, 4, 6]
    assert [float(r) for _, r in rates] == pytest.approx([lr / 2, lr, lr, lr])
    grids = sorted(f.name for f in (workdir / "plots/train_samples").iterdir())
    assert grids == ["step_0000000.png", "step_0000006.png"]  # sample_every 1000 > 6 steps: first and last


def test_sample_outputs(workdir):
    s = torch.load(workdir / "samples/ddim-3/samples.pt", weights_only=True)
    assert s["images"].shape == (24, 1, 28, 28) and s["images"].dtype == torch.uint8
    assert (workdir / "samples/ddim-3/grid.png").stat().st_size > 0


def test_sample_is_reproducible(workdir):
    r = invoke("sample", "--sampler", "ddpm", "--steps", 2, "--out", "samples/again")
    assert r.exit_code == 0, r.output
    a = torch.load(workdir / "samples/ddpm-2/samples.pt", weights_only=True)["images"]
    b = torch.load(workdir / "samples/again/samples.pt", weights_only=True)["images"]
    assert torch.equal(a, b)


def test_fid_report_and_log(workdir, monkeypatch):
    p = yaml.safe_load((workdir / "params.yaml").read_text())
    p["sample"].update(samplers=["ddpm", "ddim"], steps=[2, 3])
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))  # report and log read the matrix from it
    r = invoke("fid-ref")
    assert r.exit_code == 0 and (workdir / "data/reference/stats.pt").is_file(), r.output
    r = invoke("fid-floor")  # sample.num_samples real training images against that reference
    assert r.exit_code == 0, r.output
    floor = json.loads((workdir / "metrics/fid_floor.json").read_text())["floor"]
    assert floor["num_images"] == p["sample"]["num_samples"] and floor["fid"] > 0
    for s in p["sample"]["samplers"]:
        for k in p["sample"]["steps"]:
            if not (workdir / f"samples/{s}-{k}").exists():
                assert invoke("sample", "--sampler", s, "--steps", k, "--out", f"samples/{s}-{k}").exit_code == 0
            r = invoke("fid", "--samples", f"samples/{s}-{k}/samples.pt", "--out", f"metrics/cells/{s}-{k}.json")
            assert r.exit_code == 0, r.output
    cell = json.loads((workdir / "metrics/cells/ddim-3.json").read_text())
    assert cell["fid"] > 0 and {"kid_mean", "isc_mean"} <= cell.keys()
    r = invoke("report")
    assert r.exit_code == 0, r.output
    fid = json.loads((workdir / "metrics/fid.json").read_text())
    assert set(fid["fid"]) == {"ddpm", "ddim"} and set(fid["fid"]["ddim"]) == {"2", "3"}
    assert f"**Real-data floor**: FID {floor['fid']:.2f}" in (workdir / "reports/report.md").read_text()
    assert (workdir / "reports/fid_vs_steps.png").stat().st_size > 0
    assert "| ddim |" in (workdir / "reports/report.md").read_text()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    (workdir / "reports/.gitignore").write_text("/report.md\n")  # as DVC writes one beside its outputs
    r = invoke("log")
    assert r.exit_code == 0 and "MLflow run" in r.output, r.output
    r = invoke("log")
    assert "already in MLflow" in r.output, r.output
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ddpm"], output_format="list")
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["workspace", "train", "classifier", "sample/ddpm-2", "sample/ddpm-3",
                            "sample/ddim-2", "sample/ddim-3"])
    parent = next(r for r in runs if r.info.run_name == "workspace")
    assert parent.data.metrics["fid.ddim.3"] == pytest.approx(fid["fid"]["ddim"]["3"])
    assert parent.data.params["schedule"] == "linear"
    train = next(r for r in runs if r.info.run_name == "train")
    history = mlflow.MlflowClient().get_metric_history(train.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]
    # system metrics recorded while the stage worked, as MLflow's own `system/...` histories
    for run_name, recorded in (("train", "logs/train_system.json"), ("sample/ddim-3", "samples/ddim-3/system.json")):
        run = next(r for r in runs if r.info.run_name == run_name)
        points = json.loads((workdir / recorded).read_text())["points"]
        assert len(points) >= 1
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert [(m.step, m.timestamp, m.value) for m in history] == [
            (p["step"], p["timestamp_ms"], p["metrics"]["cpu_utilization_percentage"]) for p in points]
        assert "system/system_memory_usage_megabytes" in run.data.metrics

    # stage runs carry the stage's real start and end, and MLflow's standard tags
    client = mlflow.MlflowClient()
    timing = json.loads((workdir / "logs/train_timing.json").read_text())
    assert (train.info.start_time, train.info.end_time) == (timing["started_ms"], timing["ended_ms"])
    assert train.data.tags["mlflow.source.name"] == "python -m pipeline train"
    # the training data, its SHA-256 as the digest (cut to MLflow's 36 characters)
    sha256 = hashlib.sha256(load_split(workdir / "data/prepared/train.pt").images.contiguous().numpy().data).hexdigest()
    (data,) = client.get_run(train.info.run_id).inputs.dataset_inputs
    assert data.dataset.digest == sha256[:36] and {t.key: t.value for t in data.tags}["sha256"] == sha256
    # the EMA model: logged in train's run, registered once (the second `log` added no version),
    # loaded by its URI and sampled
    (version,) = client.search_model_versions("name = 'ddpm'")
    assert version.run_id == train.info.run_id
    (logged,) = client.get_run(train.info.run_id).outputs.model_outputs
    assert mlflow.get_logged_model(logged.model_id).tags["mlflow.source.name"] == "python -m pipeline log"
    model = mlflow.pyfunc.load_model(f"models:/ddpm/{version.version}")
    assert model.metadata.get_input_schema().input_names() == ["seed"]
    images = model.predict(pd.DataFrame({"seed": [0, 1, 0]}), params={"sampler": "ddim", "steps": 3})
    assert images.shape == (3, 1, 28, 28) and images.dtype == np.uint8
    assert (images[0] == images[2]).all() and not (images[0] == images[1]).all()  # an image is its seed's

    # what a user looks for: the best cell on the parent, a description, the report that works in MLflow
    best = fid["best"]
    assert {k: parent.data.tags[f"best.{k}"] for k in ("sampler", "steps", "fid")} == {
        k: str(v) for k, v in best.items()}
    assert f"best FID {best['fid']:.2f} ({best['sampler']}, {best['steps']} steps" in parent.data.tags[
        "mlflow.note.content"]
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "reports")}
    assert "reports/report.html" in artifacts and "reports/report.md" not in artifacts
    assert not [f for f in artifacts if f.split("/")[-1].startswith(".")]
    assert "pipeline.logging" not in parent.data.tags and parent.data.tags["pipeline.fingerprint"]
    inputs = {(d.dataset.name, t.value) for d in client.get_run(parent.info.run_id).inputs.dataset_inputs
              for t in d.tags if t.key == "mlflow.data.context"}
    assert ("fashion_mnist-test", "evaluation") in inputs, inputs
    # train's run: curves as metrics, its one-off figures as tags
    train = client.get_run(train.info.run_id)
    assert {k for k in train.data.metrics if not k.startswith("system/")} == {"loss", "lr", "grad_norm"}
    assert [m.step for m in client.get_metric_history(train.info.run_id, "lr")][:2] == [1, 2]  # warm-up from step 1
    assert float(train.data.tags["train.final_loss"]) == json.loads(
        (workdir / "metrics/train.json").read_text())["train"]["final_loss"]
    # the registered version: described, tagged, @best; the logged model holds its FID and its data sets
    version = client.get_model_version("ddpm", version.version)
    assert "EMA weights" in version.description and version.tags["best.fid"] == str(best["fid"])
    assert client.get_model_version_by_alias("ddpm", "best").version == version.version
    linked = {m.key: m.dataset_name for m in mlflow.get_logged_model(logged.model_id).metrics}
    assert linked["best.fid"] == "fashion_mnist-test" and linked["train.final_loss"] == "fashion_mnist-train"
    # every sample run says which model version it sampled
    cells = [r for r in runs if r.info.run_name.startswith("sample/")]
    assert {client.get_run(r.info.run_id).data.tags["model.uri"] for r in cells} == {f"models:/ddpm/{version.version}"}


def test_bad_param_fails_before_work(workdir, tmp_path):
    p = yaml.safe_load((workdir / "params.yaml").read_text())
    p["train"]["stepz"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(p))
    r = invoke("train", "--params", bad, "--out", tmp_path / "m.pt")
    assert r.exit_code == 1 and "train.stepz: unknown key" in r.output
    assert not (tmp_path / "m.pt").exists()


def test_bad_system_metrics_setting_fails_before_work(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "often")
    r = invoke("sample", "--sampler", "ddim", "--steps", 2, "--out", tmp_path / "s")
    assert r.exit_code == 1 and "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL must be a number" in r.output
    assert not (tmp_path / "s").exists()


def test_corrupt_checkpoint_is_one_clear_line(workdir, tmp_path):
    shutil.copy(workdir / "models/model.pt", tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 3])
    r = invoke("sample", "--checkpoint", tmp_path / "m.pt", "--sampler", "ddim", "--steps", 2, "--out", tmp_path / "s")
    assert r.exit_code == 1 and "is corrupt" in r.output
    assert not (tmp_path / "s").exists()


def test_undefined_sampler(workdir, tmp_path):
    r = invoke("sample", "--sampler", "plms", "--steps", 2, "--out", tmp_path / "s")
    assert r.exit_code == 1 and "'plms' is not defined" in r.output


def test_help_lists_every_stage():
    r = invoke("--help")
    for stage in ("prepare", "classifier", "train", "ema", "sample", "fid-ref", "fid-floor", "fid", "nll", "denoise",
                  "report", "log", "compare", "export"):
        assert stage in r.output
