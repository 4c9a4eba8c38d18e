"""System metrics: recorded by MLflow's monitors while a stage works, written to a stage
output, turned into MLflow's `system/...` histories by the log stage."""

import json
import time

import pytest

from pipeline.tracking import system_metrics


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "2")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(1000))


def test_points_while_working(tmp_path, fast):
    with system_metrics.record(tmp_path / "s.json"):
        busy(1.5)
    saved = json.loads((tmp_path / "s.json").read_text())
    points = saved["points"]
    assert saved["interval_s"] == 0.05 and saved["samples_per_point"] == 2
    assert {"CPUMonitor", "DiskMonitor", "NetworkMonitor"} <= set(saved["monitors"])
    assert len(points) >= 3  # one point per ~0.1 s after MLflow's import
    assert [p["step"] for p in points] == list(range(len(points)))
    assert all(a["timestamp_ms"] <= b["timestamp_ms"] for a, b in zip(points, points[1:]))
    assert saved["started_ms"] <= points[0]["timestamp_ms"] <= saved["started_ms"] + 1000 * saved["seconds"] + 1000
    for p in points:
        m = p["metrics"]
        assert {"cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage"} <= m.keys()
        assert 0 <= m["cpu_utilization_percentage"] <= 100 and m["system_memory_usage_megabytes"] > 0
    # a busy loop shows: not every point can read idle
    assert max(p["metrics"]["cpu_utilization_percentage"] for p in points) > 0

    metrics = system_metrics.mlflow_metrics(system_metrics.read(tmp_path / "s.json"))
    cpu = [m for m in metrics if m.key == "system/cpu_utilization_percentage"]
    assert [m.step for m in cpu] == [p["step"] for p in points]
    assert [m.timestamp for m in cpu] == [p["timestamp_ms"] for p in points]


def test_a_short_stage_still_gets_one_point(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")
    with system_metrics.record(tmp_path / "s.json"):
        busy(0.1)
    assert len(system_metrics.read(tmp_path / "s.json")) == 1


def test_switched_off_and_failed_blocks(tmp_path, fast, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with system_metrics.record(tmp_path / "off.json"):
        busy(0.2)
    assert json.loads((tmp_path / "off.json").read_text())["points"] == []
    with pytest.raises(KeyError), system_metrics.record(tmp_path / "failed.json"):
        raise KeyError("the work failed")
    assert not (tmp_path / "failed.json").exists()  # no output of a failed stage
    with system_metrics.record(tmp_path / "rank1.json", enabled=False):
        pass
    assert not (tmp_path / "rank1.json").exists()
    assert system_metrics.read(tmp_path / "absent.json") == []  # runs from before system metrics


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_bad_environment_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", value)
    with pytest.raises(ValueError, match="MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        system_metrics.settings()
