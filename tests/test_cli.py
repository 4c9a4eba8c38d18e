"""Every stage command through Typer's runner, on tiny synthetic data, in a temp folder."""

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_params
from pipeline.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, idx_dir):
    """Runs prepare → classifier → train → ema → sample → fid → report once for the module."""
    wd = tmp_path_factory.mktemp("cli")
    (wd / "params.yaml").write_text(yaml.safe_dump(tiny_params(idx_dir)))
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
    acc = json.loads((workdir / "metrics/classifier.json").read_text())["test_accuracy"]
    assert 0.0 <= acc <= 1.0
    train = json.loads((workdir / "metrics/train.json").read_text())
    assert train["steps"] == 6
    assert (workdir / "plots/train_loss.csv").read_text().splitlines() [0] == "step,loss"
    assert len((workdir / "plots/train_loss.csv").read_text().splitlines()) == 1 + 3  # log_every=2


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
    assert (workdir / "reports/fid_vs_steps.png").stat().st_size > 0
    assert "| ddim |" in (workdir / "reports/report.md").read_text()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
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
    for stage in ("prepare", "classifier", "train", "ema", "sample", "fid-ref", "fid", "nll", "denoise", "report",
                  "log", "compare"):
        assert stage in r.output
