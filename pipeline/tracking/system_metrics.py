"""System metrics recorded while a stage works, for MLflow's "System metrics" tab.

MLflow's own monitors (CPU and memory, disk, network, and NVIDIA GPUs when
``nvidia-ml-py`` finds one: memory, utilisation, power) are sampled by a background
thread. MLflow would log them straight into an active run (``log_system_metrics=True``),
but here no MLflow run exists while the work happens: the `log` stage runs last, and
a run that DVC restores from its run-cache is logged without re-running. So the
points go to a stage output (JSON), and `log` writes them to the stage's MLflow run as
the metric histories ``system/<name>`` (step = point, with the recorded timestamps),
the keys MLflow itself uses.

MLflow's environment variables set the rate: ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
(seconds between samples; here 2 by default) and
``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`` (samples averaged into one point; 5),
so one point per 10 s; a stage shorter than that still gets one point.
``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns recording off (the file is still
written, with no points). Recording never fails a stage: a monitor that raises is
dropped with a warning.
"""

import json
import os
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from ddpm.errors import InputError
from pipeline.outputs import write_atomic

PREFIX = "system/"


def _env_number(name: str, default, cast):
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = cast(value)
    except ValueError:
        raise InputError(f"environment variable {name} must be a number, got {value!r}") from None
    if number <= 0:
        raise InputError(f"environment variable {name} must be positive, got {value!r}")
    return number


def settings() -> dict:
    """Read (and check) the environment before any work starts."""
    enabled = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0", "no")
    return {"enabled": enabled,
            "interval_s": _env_number("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 2.0, float),
            "samples_per_point": _env_number("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", 5, int)}


def _monitors() -> list:
    """MLflow's monitors that work on this machine."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        monitors.append(GPUMonitor())  # raises without nvidia-ml-py or without an NVIDIA GPU
    except Exception:
        pass
    import psutil

    psutil.cpu_percent()  # the first call only starts psutil's interval: CPUMonitor's first sample is real
    return monitors


class Recorder:
    """A daemon thread sampling ``monitors``; ``stop()`` returns the points."""

    def __init__(self, monitors: list, interval_s: float, samples_per_point: int):
        self.monitors, self.interval_s, self.samples_per_point = monitors, interval_s, samples_per_point
        self.points: list[dict] = []
        self.monitor_names = [type(m).__name__ for m in monitors]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)

    def start(self) -> "Recorder":
        self._thread.start()
        return self

    def _collect(self, monitors: list) -> list:
        alive = []
        for m in monitors:
            try:
                m.collect_metrics()
                alive.append(m)
            except Exception as e:  # noqa: BLE001 - a broken monitor must not fail the stage
                warnings.warn(f"system metrics: {type(m).__name__} dropped: {e}", stacklevel=1)
        return alive

    def _point(self, monitors: list) -> None:
        metrics = {}
        for m in monitors:
            if m.metrics:
                metrics.update(m.aggregate_metrics())
            m.clear_metrics()
        if metrics:
            self.points.append({"step": len(self.points), "timestamp_ms": int(time.time() * 1000),
                                "metrics": metrics})

    def _run(self) -> None:
        monitors, stopped = self.monitors, False
        while not stopped:
            for _ in range(self.samples_per_point):
                stopped = self._stop.wait(self.interval_s)
                monitors = self._collect(monitors)  # at the end of each interval: CPU % covers it
                if stopped:
                    break
            self._point(monitors)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.points


@contextmanager
def record(path: Path, enabled: bool = True):
    """Record system metrics while the block runs; write them to ``path`` (atomically) when it
    ends without an error. ``enabled=False`` (DDP ranks other than 0) records and writes nothing."""
    if not enabled:
        yield
        return
    cfg = settings()
    recorder = None
    if cfg["enabled"]:
        try:  # here, not in the thread: importing MLflow takes a second or two, and the work would start unwatched
            recorder = Recorder(_monitors(), cfg["interval_s"], cfg["samples_per_point"]).start()
        except Exception as e:  # noqa: BLE001 - recording never fails a stage
            warnings.warn(f"system metrics: not recorded ({type(e).__name__}: {e})", stacklevel=1)
    started = time.time()
    try:
        yield
    finally:
        points = recorder.stop() if recorder else []
    write_atomic(path, json.dumps({**cfg, "monitors": recorder.monitor_names if recorder else [],
                                   "started_ms": int(started * 1000), "seconds": round(time.time() - started, 2),
                                   "points": points}, indent=2) + "\n")


def read(path: Path) -> list[dict]:
    """The points of a file ``record`` wrote; [] when it does not exist (an older run)."""
    path = Path(path)
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("points", [])


def mlflow_metrics(points: list[dict]) -> list:
    """The points as MLflow ``Metric`` entities, keyed ``system/<name>`` like MLflow's own."""
    from mlflow.entities import Metric

    return [Metric(PREFIX + key, float(value), p["timestamp_ms"], p["step"])
            for p in points for key, value in p["metrics"].items()]
