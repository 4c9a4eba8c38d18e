"""Resumable, deterministic training: kill -9 and rerun ends with the weights (and the
post-hoc EMA snapshots) of an uninterrupted run; a resume file from another config is
never resumed into; a NaN loss stops training naming its step and keeps the last good
checkpoint."""

import json
import signal
import subprocess
import time

import pytest
import torch
from tiny import cli, errors, python, subprocess_env, weights, workspace, write_params  # noqa: F401

import ddpm.training
from ddpm.checkpoint import load_snapshot

STATE = "checkpoints/train_state.pt"  # an explicit --state (without {fingerprint}: one file for any config)
STAGING = "checkpoints/train_state.snapshots"  # the snapshots while training
SNAPSHOTS = "models/ema_snapshots"
TRAIN = ("-m", "pipeline", "train", "--device", "cpu")


def state_files(root) -> list:
    """The default resume files, checkpoints/train-<fingerprint>.pt under the workspace."""
    return sorted((root / "checkpoints").glob("train-*.pt"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    steps = 40
    ref, crash = workspace(tmp_path / "ref", steps=steps, checkpoint_every=4, log_every=3), \
        workspace(tmp_path / "crash", steps=steps, checkpoint_every=4, log_every=3)
    env = subprocess_env()
    killed = subprocess.Popen(python(*TRAIN), cwd=crash, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not state_files(crash):  # the first checkpoint
        assert killed.poll() is None and time.monotonic() < deadline, "train ended before its first checkpoint"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (state,) = state_files(crash)
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < steps and not (crash / "models/model.pt").exists()

    resumed = subprocess.run(python(*TRAIN), cwd=crash, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step} of {state.relative_to(crash)}" in resumed.stdout
    uninterrupted = cli(ref, *TRAIN[2:])  # in-process, one thread like the subprocesses
    assert uninterrupted.exit_code == 0, uninterrupted.output
    assert not state_files(crash)  # removed once the outputs are written

    for f in ("metrics/train.json", "plots/train_loss.csv"):
        assert (crash / f).read_text() == (ref / f).read_text(), f
    assert json.loads((crash / "metrics/train.json").read_text())["train"]["final_step"] == steps
    a, b = weights(ref / "models/model.pt"), weights(crash / "models/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, EMA included
    assert_same_snapshots(ref, crash, steps=list(range(2, steps + 1, 2)))  # ema_snapshot_every = 2


def assert_same_snapshots(a, b, steps: list[int]):
    """The post-hoc EMA snapshots of two runs: the same steps, bit-identical weights."""
    index = json.loads((a / SNAPSHOTS / "index.json").read_text())
    assert index["steps"] == steps and index == json.loads((b / SNAPSHOTS / "index.json").read_text())
    assert sorted(f.name for f in (b / SNAPSHOTS).iterdir()) == sorted([*index["files"], "index.json"])
    for name in index["files"]:
        x, y = load_snapshot(a / SNAPSHOTS / name), load_snapshot(b / SNAPSHOTS / name)
        assert x["step"] == y["step"] and x["sigma_rels"] == y["sigma_rels"] == [0.05, 0.1]
        for wx, wy in zip(x["weights"], y["weights"], strict=True):
            assert wx.keys() == wy.keys() and all(torch.equal(wx[k], wy[k]) for k in wx), name
    assert not list(b.glob("checkpoints/*.snapshots"))  # removed with the resume file


def test_resume_keeps_the_snapshots_it_lists_and_redoes_later_ones(tmp_path, monkeypatch):
    cfg = dict(steps=8, checkpoint_every=4, ema_snapshot_every=2)
    root, ref = workspace(tmp_path / "crash", **cfg), workspace(tmp_path / "ref", **cfg)
    with monkeypatch.context() as m:  # dies in step 7: snapshots 2, 4, 6 written, the resume file (step 4) lists 2, 4
        inject(m, at_step=7, error=KeyboardInterrupt)
        assert cli(root, "train", "--device", "cpu", "--state", STATE).exit_code != 0
    state = torch.load(root / STATE, weights_only=True)
    assert state["step"] == 4 and state["ema_snapshots"] == [2, 4]
    assert sorted(f.name for f in (root / STAGING).iterdir()) == [f"step-000000{k}.pt" for k in (2, 4, 6)]
    (root / STAGING / "step-0000006.pt").write_bytes(b"a snapshot from after the resume file")
    resumed = cli(root, "train", "--device", "cpu", "--state", STATE)
    assert resumed.exit_code == 0 and "resuming from step 4" in resumed.stdout, resumed.output
    assert cli(ref, "train", "--device", "cpu").exit_code == 0
    assert_same_snapshots(ref, root, steps=[2, 4, 6, 8])


def test_resume_fails_clearly_when_a_listed_snapshot_is_gone(tmp_path, monkeypatch):
    root = workspace(tmp_path, steps=6, checkpoint_every=4, ema_snapshot_every=2)
    with monkeypatch.context() as m:
        inject(m, at_step=5, error=KeyboardInterrupt)
        assert cli(root, "train", "--device", "cpu", "--state", STATE).exit_code != 0
    (root / STAGING / "step-0000002.pt").unlink()
    result = cli(root, "train", "--device", "cpu", "--state", STATE)
    assert result.exit_code == 1
    assert errors(result) == [f"error: resume file {STATE} lists EMA snapshots missing from {STAGING}: step-0000002.pt"]
    assert not (root / "models/model.pt").exists()


def test_same_params_and_seed_give_identical_outputs(tmp_path):
    runs = [workspace(tmp_path / name) for name in ("a", "b")]
    for root in runs:
        result = cli(root, "train", "--device", "cpu")
        assert result.exit_code == 0, result.output
    a, b = runs
    for f in ("metrics/train.json", "plots/train_loss.csv"):
        assert (a / f).read_text() == (b / f).read_text()
    wa, wb = weights(a / "models/model.pt"), weights(b / "models/model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def inject(monkeypatch, at_step: int, value=float("nan"), error: type[BaseException] | None = None):
    """From training step ``at_step`` on, the loss is ``value`` (or ``error`` is raised)."""
    real, calls = ddpm.training.training_terms, [0]

    def terms(*args, **kwargs):
        calls[0] += 1
        out = real(*args, **kwargs)
        if calls[0] >= at_step:
            if error is not None:
                raise error("injected crash")
            return {**out, "loss": out["loss"] * value}
        return out

    monkeypatch.setattr(ddpm.training, "training_terms", terms)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    root = workspace(tmp_path, steps=12, log_every=3, checkpoint_every=2)
    inject(monkeypatch, at_step=5)
    result = cli(root, "train", "--device", "cpu")
    assert result.exit_code == 1
    lines = errors(result)
    (path,) = state_files(root)
    assert lines == [f"error: training loss became nan at step 5; training stopped, "
                     f"the last good checkpoint is {path.relative_to(root)} at step 4"]
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and all(v.isfinite().all() for v in state["model"].values())
    assert not (root / "models/model.pt").exists() and not (root / "metrics/train.json").exists()


def test_inf_loss_also_stops(tmp_path, monkeypatch):
    root = workspace(tmp_path, steps=4, log_every=4, checkpoint_every=0)
    inject(monkeypatch, at_step=2, value=float("inf"))
    result = cli(root, "train", "--device", "cpu")
    assert result.exit_code == 1
    assert "training loss became inf at step 2; training stopped, no checkpoint was written" in result.stderr


def test_resume_file_from_another_config_is_never_resumed(tmp_path, monkeypatch):
    root = workspace(tmp_path, steps=6, checkpoint_every=2)
    with monkeypatch.context() as m:  # a crash after the checkpoint at step 2 leaves the resume file
        inject(m, at_step=3, error=KeyboardInterrupt)
        assert cli(root, "train", "--device", "cpu", "--state", STATE).exit_code != 0
    assert torch.load(root / STATE, weights_only=True)["step"] == 2

    write_params(root, top={"schedule": "cosine"})  # e.g. a DVC experiment beside the crashed baseline
    required = cli(root, "train", "--device", "cpu", "--state", STATE, "--resume", "require")
    assert required.exit_code == 1
    assert errors(required) == [
        f"error: resume file {STATE} is from another config (differs in schedule)"]
    assert not (root / "models/model.pt").exists()

    fresh = cli(root, "train", "--device", "cpu", "--state", STATE)
    assert fresh.exit_code == 0, fresh.output
    assert "is from another config (differs in schedule): starting fresh" in fresh.stdout
    assert json.loads((root / "logs/train_timing.json").read_text())["resumed_from_step"] == 0
    clean = workspace(tmp_path / "clean")  # the same cosine run from scratch
    write_params(clean, top={"schedule": "cosine"})
    assert cli(clean, "train", "--device", "cpu").exit_code == 0
    a, b = weights(root / "models/model.pt"), weights(clean / "models/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_resume_file_fails_clearly(tmp_path):
    root = workspace(tmp_path)
    (root / "checkpoints").mkdir()
    good = tmp_path / "good.pt"
    torch.save({"x": torch.zeros(1000)}, good)
    (root / STATE).write_bytes(good.read_bytes()[:300])
    result = cli(root, "train", "--device", "cpu", "--state", STATE)
    assert result.exit_code == 1
    lines = errors(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {STATE} is corrupt")
    assert not (root / "models/model.pt").exists()


def test_a_killed_queued_experiment_resumes_in_its_next_workspace(tmp_path, monkeypatch):
    """DVC runs a queued experiment in a fresh temporary copy, .dvc/tmp/exps/<queue>/<tmp>, with
    DVC_ROOT pointing at it: the resume file lives under the repository root instead, keyed by
    the training fingerprint, so the experiment's next attempt (another copy) resumes."""
    root = tmp_path / "repo"
    first = workspace(root / ".dvc/tmp/exps/standalone/tmpa1", steps=6, checkpoint_every=2)
    with monkeypatch.context() as m:
        inject(m, at_step=5, error=KeyboardInterrupt)
        assert cli(first, "train", "--device", "cpu", env={"DVC_ROOT": str(first)}).exit_code != 0
    (state,) = state_files(root)
    assert torch.load(state, weights_only=True)["step"] == 4 and not list(first.glob("checkpoints/*"))
    again = workspace(root / ".dvc/tmp/exps/standalone/tmpb2", steps=6, checkpoint_every=2)
    resumed = cli(again, "train", "--device", "cpu", env={"DVC_ROOT": str(again)})
    assert resumed.exit_code == 0 and f"resuming from step 4 of {state}" in resumed.stdout, resumed.output
    assert not state_files(root)
    other = workspace(root / ".dvc/tmp/exps/standalone/tmpc3", steps=6, checkpoint_every=2, lr=1.0e-3)
    with monkeypatch.context() as m:  # another config (another experiment of the queue) has its own file
        inject(m, at_step=3, error=KeyboardInterrupt)
        assert cli(other, "train", "--device", "cpu", env={"DVC_ROOT": str(other)}).exit_code != 0
    assert len(state_files(root)) == 1 and state_files(root)[0].name != state.name
