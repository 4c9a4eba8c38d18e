"""`train` logs to its MLflow run while it trains: the run exists, with its loss / lr /
gradient-norm history and step-indexed preview grids, before training ends; it carries the
stage's real start and end, MLflow's standard tags, the params and the training data set
(SHA-256 digest), in an experiment tagged for the UI's model-training view. A killed run
that resumes continues the same MLflow run. (The `log` stage attaching it: test_cli, test_e2e.)"""

import json
import time

import pytest
from test_resume import inject
from tiny import cli, workspace

import ddpm.training
from pipeline.tracking.live import image_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def the_run(uri: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("ddpm")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return client, exp, runs


def test_train_logs_live_and_resumes_its_run(tmp_path, monkeypatch):
    root = workspace(tmp_path, steps=6, log_every=2, checkpoint_every=2, sample_every=2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {"PIPELINE_LIVE_MLFLOW": "1", "MLFLOW_TRACKING_URI": uri}
    seen = {}
    real = ddpm.training.training_terms
    calls = [0]

    def watch(*args, **kwargs):  # during step 5: what MLflow shows of the run so far
        calls[0] += 1
        if calls[0] == 5:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                client, _, runs = the_run(uri)
                if runs and image_steps(client, runs[0].info.run_id) == {0, 2, 4} \
                        and [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [2, 4]:
                    seen.update(status=runs[0].info.status, grad_norm=[m.step for m in client.get_metric_history(
                        runs[0].info.run_id, "grad_norm")])
                    break
                time.sleep(0.2)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:  # a first attempt dies in step 5, after the checkpoint at step 4
        m.setattr(ddpm.training, "training_terms", watch)
        inject(m, at_step=5, error=KeyboardInterrupt)
        assert cli(root, "train", "--device", "cpu", env=env).exit_code != 0
    assert seen == {"status": "RUNNING", "grad_norm": [2, 4]}, "the run did not show loss and grids while training"
    client, exp, (killed,) = the_run(uri)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None

    result = cli(root, "train", "--device", "cpu", env=env)
    assert result.exit_code == 0 and "resuming from step 4" in result.stdout, result.output
    client, exp, (run,) = the_run(uri)  # the same run, continued
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for key in ("loss", "grad_norm"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4, 6], key
    # the learning rate from step 1: its warm-up (2 steps) before the first logged step
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == [1, 2, 4, 6]
    assert image_steps(client, run.info.run_id) == {0, 2, 4, 6}  # step 0: the initial weights
    timing = json.loads((root / "logs/train_timing.json").read_text())
    assert run.info.end_time == timing["ended_ms"] and run.info.start_time < timing["started_ms"]  # first attempt's
    assert run.data.tags["mlflow.source.name"] == "python -m pipeline train" and "mlflow.user" in run.data.tags
    assert run.data.params["train.steps"] == "6" and run.data.params["schedule"] == "linear"
    record = json.loads((root / "logs/train_mlflow.json").read_text())
    assert record["run_id"] == run.info.run_id and record["complete"]
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.digest == record["dataset"]["sha256"][:36] and len(record["dataset"]["sha256"]) == 64
    assert sorted(f.name for f in (root / "plots/train_samples").iterdir()) == [
        "step_0000000.png", "step_0000002.png", "step_0000004.png", "step_0000006.png"]


def test_a_dead_tracking_server_costs_training_nothing(tmp_path):
    """Live logging is best-effort: with nothing listening at the tracking URI, train still
    writes every output and records what did not reach MLflow, for `log` (and its outbox)."""
    from test_tracking import closed_port

    root = workspace(tmp_path, steps=4, log_every=2, sample_every=2)
    env = {"PIPELINE_LIVE_MLFLOW": "1", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}"}
    result = cli(root, "train", "--device", "cpu", env=env)
    assert result.exit_code == 0, result.output
    assert "warning: live MLflow logging incomplete" in result.stdout
    record = json.loads((root / "logs/train_mlflow.json").read_text())
    assert record["run_id"] is None and not record["complete"] and record["error"]
    assert json.loads((root / "metrics/train.json").read_text())["train"]["final_step"] == 4
    assert len(list((root / "plots/train_samples").iterdir())) == 3  # steps 0, 2, 4
