"""The MLflow run of `train`, logged while it trains: a background thread does every MLflow
call, training only hands it what to log, so a slow or dead tracking server never stalls
training and the UI shows the run as it goes (loss, learning rate and gradient norm every
``train.log_every`` steps, the learning rate of every warm-up step, a preview grid every
``train.sample_every`` steps as a step-indexed image, the params and the training data set).

The run is created with the stage's real start time and closed with its real end time (``FINISHED``;
``FAILED`` when training failed; ``KILLED`` when it was stopped by Ctrl-C or SIGTERM). A resumed
training continues the run of the attempt it resumes (its id travels in the resume file) and skips
the metric steps and images that run already has.

The first MLflow error ends live logging for this run: what follows is dropped, not
retried (the `log` stage fills in what the run lacks from the stage's outputs, so nothing
is lost). ``finish`` waits a bounded time for the thread and returns a record of what
happened, which `train` writes to ``logs/train_mlflow.json`` for `log`.
"""

import queue
import threading

from pipeline.tracking import client as tracking

IMAGE_KEY = "samples"  # the key of the preview grids (mlflow.log_image(key=..., step=...))


class LiveRun:
    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str, tags: dict, start_ms: int,
                 resume_run_id: str | None = None):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_name, self.tags, self.start_ms = run_name, tags, start_ms
        self.resume_run_id = resume_run_id
        self.run_id: str | None = None  # once the thread created (or reopened) the run
        self.experiment_id: str | None = None
        self.error: str | None = None
        self.sent = {"metrics": 0, "images": 0, "params": 0, "datasets": 0}
        self.skipped = self.dropped = 0
        self._have: set = set()  # (key, step) the run already had when it was reopened
        self._queue: queue.Queue = queue.Queue()
        self._ended = False
        self.closed = False  # finish was called (the run is closed, or was given up on)
        self._opened = threading.Event()  # set once the run is created or reopened (or that failed)
        tracking.http_defaults()  # here: the thread must not change the environment
        self._thread = threading.Thread(target=self._work, name="mlflow-live", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the training side
    def log_params(self, params: dict) -> None:
        self._queue.put(("params", params))

    def log_dataset(self, make_input) -> None:
        """``make_input(mlflow)`` returns the ``DatasetInput`` (built in the thread: it needs MLflow)."""
        self._queue.put(("dataset", make_input))

    def log_metrics(self, step: int, values: dict[str, float], timestamp_ms: int) -> None:
        self._queue.put(("metrics", (step, values, timestamp_ms)))

    def log_series(self, points: list[tuple[str, float, int]], timestamp_ms: int) -> None:
        """Many points at once, (key, value, step) each (the learning rate of the warm-up's steps)."""
        self._queue.put(("series", (points, timestamp_ms)))

    def log_image(self, step: int, path, timestamp_ms: int) -> None:
        """The PNG at ``path`` as the step-indexed image ``samples`` of ``step``."""
        self._queue.put(("image", (step, path, timestamp_ms)))

    def opened_run_id(self, timeout: float = 30.0) -> str | None:
        """The run's id, waiting at most ``timeout`` seconds for the thread to create it (the
        resume file records it, so that a resumed training continues this run)."""
        self._opened.wait(timeout)
        return self.run_id

    def finish(self, status: str, end_ms: int, timeout: float = 30.0) -> dict:
        """Close the run (``FINISHED`` / ``FAILED`` / ``KILLED``) with ``end_ms`` as its end time, waiting at
        most ``timeout`` seconds for what is queued; the record of what reached MLflow."""
        self.closed = True
        self._queue.put(("end", (status, end_ms)))
        self._thread.join(timeout)
        done = not self._thread.is_alive()
        if not done and self.error is None:
            self.error = f"MLflow did not answer within {timeout:.0f} s"
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "experiment_id": self.experiment_id, "run_id": self.run_id,
                "complete": done and self._ended and self.error is None,
                "error": self.error, "sent": dict(self.sent), "already_there": self.skipped,
                "dropped": self.dropped}

    # ------------------------------------------------------------------ the thread
    def _work(self) -> None:
        try:
            mlflow = tracking.mlflow_module()
            client = mlflow.MlflowClient(self.tracking_uri)
            self.experiment_id = tracking.experiment_id(client, self.experiment, self.tracking_uri)
            self.run_id = self._open(client)
        except Exception as e:  # noqa: BLE001 - tracking is best-effort: the DVC outputs are the record
            self._fail(e)
        finally:
            self._opened.set()
        while True:
            kind, item = self._queue.get()
            if kind == "end" and self.error is None:
                try:
                    client.set_terminated(self.run_id, item[0], end_time=item[1])
                    self._ended = True
                except Exception as e:  # noqa: BLE001
                    self._fail(e)
            if kind == "end":
                return
            if self.error is not None:
                self.dropped += 1
                continue
            try:
                self._send(mlflow, client, kind, item)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
                self.dropped += 1

    def _fail(self, e: Exception) -> None:
        if self.error is None:
            first = str(e).splitlines()[0] if str(e) else ""
            self.error = f"{type(e).__name__}: {first}"[:500]

    def _open(self, client) -> str:
        """Reopen the run being resumed (when it is still there, in this experiment), else create one."""
        if self.resume_run_id:
            try:
                run = client.get_run(self.resume_run_id)
            except Exception:  # noqa: BLE001 - deleted for good, or from another store
                run = None
            if run is not None and run.info.lifecycle_stage == "active" \
                    and run.info.experiment_id == self.experiment_id:
                for key in ("loss", "lr", "grad_norm"):
                    self._have |= {(key, m.step) for m in client.get_metric_history(run.info.run_id, key)}
                self._have |= {("image", step) for step in image_steps(client, run.info.run_id)}
                client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id
        run = client.create_run(self.experiment_id, start_time=self.start_ms, tags=self.tags,
                                run_name=self.run_name)
        return run.info.run_id

    def _send(self, mlflow, client, kind: str, item) -> None:
        from mlflow.entities import Metric, Param

        if kind == "params":
            have = client.get_run(self.run_id).data.params if self.resume_run_id else {}
            new = [Param(k, str(v)) for k, v in item.items() if k not in have]
            for i in range(0, len(new), 100):
                client.log_batch(self.run_id, params=new[i:i + 100])
            self.sent["params"] += len(new)
        elif kind == "dataset":
            client.log_inputs(self.run_id, datasets=[item(mlflow)])
            self.sent["datasets"] += 1
        elif kind == "metrics":
            step, values, ts = item
            metrics = [Metric(k, float(v), ts, step) for k, v in values.items() if (k, step) not in self._have]
            self.skipped += len(values) - len(metrics)
            if metrics:
                client.log_batch(self.run_id, metrics=metrics)
                self.sent["metrics"] += len(metrics)
        elif kind == "series":
            points, ts = item
            metrics = [Metric(k, float(v), ts, step) for k, v, step in points if (k, step) not in self._have]
            self.skipped += len(points) - len(metrics)
            for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
                client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
            self.sent["metrics"] += len(metrics)
        elif kind == "image":
            step, path, ts = item
            if ("image", step) in self._have:
                self.skipped += 1
                return
            from PIL import Image

            with Image.open(path) as im:
                client.log_image(self.run_id, im.copy(), key=IMAGE_KEY, step=step, timestamp=ts)
            self.sent["images"] += 1


def image_files(client, run_id: str, key: str = IMAGE_KEY) -> dict[int, str]:
    """Step → artifact path of the step-indexed PNG images ``key`` of a run (MLflow stores them as
    ``images/<key>+step+<step>+timestamp+…png``, beside a compressed copy; older versions used ``%`` for ``+``)."""
    import re

    files = {}
    for f in client.list_artifacts(run_id, "images"):
        m = re.match(rf"images/{re.escape(key)}[+%]step[+%](\d+)[+%]", f.path)
        if m and f.path.endswith(".png"):
            files[int(m.group(1))] = f.path
    return files


def image_steps(client, run_id: str, key: str = IMAGE_KEY) -> set[int]:
    """The steps of the step-indexed images ``key`` a run has (``image_files``)."""
    return set(image_files(client, run_id, key))
