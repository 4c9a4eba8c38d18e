"""Stage `train`: train the diffusion U-Net and write a self-describing checkpoint,
the training metrics, the loss curve and the system metrics recorded while it trained.

Resumable: every ``train.checkpoint_every`` steps the whole training state is written
atomically to ``--state`` (default ``checkpoints/train-<fingerprint>.pt`` under the repository
root, not a DVC output, so that a killed queued experiment finds it from its new temporary
workspace);
a run that finds it resumes from it, and ends with the same weights as an uninterrupted
run (``ddpm.resume``). The file carries a fingerprint of the training params (all the stage's
params except ``NOT_FINGERPRINTED``) and of the training images: a file from another config is
never resumed into; with ``--resume auto`` a run says so and starts fresh, with ``--resume
require`` it fails. The file is deleted once the
outputs are written.

A SIGTERM (``kill``, ``timeout``, SLURM, Kubernetes, a preempted machine) is a stop, as Ctrl-C is: training
ends at the end of the step it is in (under ``torchrun``: at the next logged step, where the ranks agree), the
resume state of that step is written (when ``train.checkpoint_every`` > 0), the live MLflow run is marked
KILLED with its end time, and the stage exits with status 143 and one line naming the resume state; a second
SIGTERM, or no step boundary within ``STOP_GRACE`` seconds, stops at once and the line names the last resume
state (``pipeline.stages._cli.stop_at_safe_point``). A run that fails or stops before any resume state was
written removes its staging folders (``<state>.samples``, ``<state>.snapshots``); after a SIGKILL the next
run of the same config clears them (or, with a resume state beside them, resumes with them).

Under ``torchrun`` this is DDP training: rank 0 reads and writes
files and prints, the others train. With ``conditioning: class`` the U-Net is
class-conditional on the split's labels (``cond_drop`` of them dropped to the null class);
the checkpoint records the class names.

The checkpoint holds the raw weights (``model``), their average (``ema``, the rule of
``train.ema``) and ``ema_config`` naming that rule. Post-hoc EMA: after each step of
``train.ema_snapshot_every`` (and the last) the power EMAs of ``train.ema_profiles`` are
written in float16 to ``<state>.snapshots/step-NNNNNNN.pt`` beside the resume file (DVC
deletes a stage's outputs before it runs, so they cannot live in the output folder while
training); the resume file lists those it covers, a resumed run drops any written after
it, and at the end they are published, with ``index.json``, as ``--snapshots``.

Live MLflow (``pipeline.tracking.live``): the run is created when training starts, with the stage's
real start time, and receives loss, learning rate and gradient norm every ``train.log_every``
steps (the learning rate also at every step of the warm-up, from step 1, so that its ramp
shows) and a preview grid of the EMA model (``ddpm.preview``) at step 0 (the initial weights)
and every ``train.sample_every`` steps as a step-indexed image; the grids are also written to
``--samples``. The same values go to ``--plot`` (``step,loss,lr,grad_norm`` per logged step) and
``--lr-plot`` (``step,lr``: every warm-up step and every logged step). ``--metrics`` holds
``train.final_loss``, ``train.final_step`` and ``train.parameters``.
"""

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from enum import Enum

import torch
import typer

from ddpm import distributed
from ddpm.checkpoint import CheckpointError, save_checkpoint, save_snapshot
from ddpm.data import DataError, Split, load_split
from ddpm.ema import averaged_weights
from ddpm.errors import DivergedError, InputError
from ddpm.files import atomic_folder, copy_file
from ddpm.guidance import balanced_labels
from ddpm.model import ModelSpec
from ddpm.pixels import to_uint8
from ddpm.posthoc_ema import SNAPSHOT_DTYPE, snapshot
from ddpm.preview import preview
from ddpm.resume import (RESUME_MODES, data_identity, fingerprint, prepare_staging, publish_snapshots,
                         read_resume_file, snapshot_index, snapshot_name, staging_dir)
from ddpm.timestep_sampling import make_timestep_sampler
from ddpm.training import init_state, learning_rate, load_train_state, to_cpu, train, train_state_dict
from pipeline.device import resolve_device
from pipeline.launch import data_parallel
from pipeline.images import write_image_grid
from pipeline.outputs import check_writable, write_csv, write_json, write_metrics
from pipeline.params import base, diffusion, model, train as train_section
from pipeline.params.base import View, flatten
from pipeline.progress import progress
from pipeline.stages._cli import DEVICE, PARAMS, Terminated, stage, stage_app, stop_at_safe_point
from pipeline.tracking import system_metrics
from pipeline.tracking.client import (dataset_input, default_tracking_uri, mlflow_params, now_ms, standard_tags,
                                      training_dataset, ui_url)
from pipeline.tracking.live import LiveRun
from pipeline.workspace import experiment_name, repo_root

KEYS = ["seed", "schedule", "prediction", "timesteps", "loss", "variance", "timestep_sampling", "hybrid_lambda",
        "conditioning", "cond_drop", "model", "train"]
Resume = Enum("Resume", {m: m for m in RESUME_MODES}, type=str)  # --resume: ddpm.resume's modes
# they do not change the trained weights
NOT_FINGERPRINTED = ("train.checkpoint_every", "train.log_every", "train.sample_every")
STATE = "checkpoints/train-{fingerprint}.pt"  # relative to the repository root
PREVIEW_IMAGES, PREVIEW_STEPS, PREVIEW_SEED = 16, 50, 0  # the preview grids: 4×4 images, 50 ancestral steps


def training_config(p: View, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """What determines the trained weights: the stage's params (minus NOT_FINGERPRINTED),
    flattened, plus the training images' shape and SHA-256 (and the labels', when they are used)."""
    flat = flatten(base.values(p._obj, KEYS))
    for key in NOT_FINGERPRINTED:
        flat.pop(key, None)
    return {**flat, **data_identity(images, labels)}


def state_file(template: Path, fp: str) -> Path:
    """``--state`` with ``{fingerprint}`` filled in. A relative path is anchored on the
    repository root (``DVC_ROOT``, mapped out of DVC's temporary experiment workspaces), so a
    queued experiment that was killed finds its state when it runs again in a new workspace."""
    path = Path(str(template).replace("{fingerprint}", fp))
    path = path if path.is_absolute() else repo_root() / path
    try:  # relative to the working directory when inside it: shorter in messages
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def preview_grid(state, diffusion, spec: ModelSpec, path: Path) -> None:
    """A grid of PREVIEW_IMAGES samples of the EMA model (``ddpm.preview``, always the same
    noise), written to ``path``; the model's mode and the global RNG are left as they were."""
    net = state.ema.module
    was_training = net.training
    net.eval()
    g = torch.Generator(device=diffusion.device).manual_seed(PREVIEW_SEED)
    model = net
    if spec.num_classes:  # class-conditional: image i of class i mod K
        labels = balanced_labels(PREVIEW_IMAGES, spec.num_classes, device=diffusion.device)
        model = lambda x, t: net(x, t, labels)  # noqa: E731
    x = preview(model, diffusion, (PREVIEW_IMAGES, spec.channels, spec.image_size, spec.image_size),
                steps=min(PREVIEW_STEPS, spec.timesteps), prediction=spec.prediction, variance=spec.variance,
                generator=g)
    net.train(was_training)
    write_image_grid(path, to_uint8(x).cpu(), nrow=int(PREVIEW_IMAGES ** 0.5))


def replace_folder(src: Path, dst: Path) -> None:
    """Copy the files of ``src`` into a fresh folder ``dst`` (built beside it, then swapped in)."""
    with atomic_folder(dst) as tmp:
        for f in sorted(src.glob("*.png")) if src.is_dir() else []:
            copy_file(f, tmp / f.name)


@dataclass(frozen=True)
class Outputs:
    """The stage's outputs (dvc.yaml's outs, reaching the code as CLI options)."""
    checkpoint: Path
    metrics: Path
    plot: Path
    lr_plot: Path
    timing: Path
    system: Path
    snapshots: Path
    samples: Path
    mlflow_run: Path

    def check_writable(self, state_dir: Path) -> None:
        check_writable(self.checkpoint, self.metrics, self.plot, self.lr_plot, self.timing, self.system,
                       self.mlflow_run, folders=[self.samples, state_dir])


@dataclass(frozen=True)
class Job:
    """One training, decided before any work: the stage's params, the images (and labels) it trains
    on, the model, the checkpoint's config (with the fingerprint) and where its resumable files go."""
    p: View
    images: torch.Tensor
    labels: torch.Tensor | None
    spec: ModelSpec
    config: dict  # model, train, seed, objective, training, fingerprint
    state_path: Path
    dataset: dict  # for MLflow's "Datasets"

    @property
    def staging(self) -> Path:
        return staging_dir(self.state_path)

    @property
    def previews(self) -> Path:
        return self.state_path.with_name(self.state_path.stem + ".samples")  # beside the state: they survive a kill too


def training_split(data: Path, conditioning: str) -> tuple[Split, torch.Tensor | None]:
    """The training split (square images), and its labels (checked against its classes) when the
    U-Net is class-conditional."""
    split = load_split(data)
    _, _, height, width = split.images.shape
    if height != width:
        raise InputError(f"{data}: images must be square, got {height}×{width}")
    labels = split.labels if conditioning == "class" else None
    if labels is not None and not bool(((labels >= 0) & (labels < len(split.classes))).all()):
        raise DataError(f"{data}: labels must lie in [0, {len(split.classes)}) for its {len(split.classes)} classes")
    return split, labels


def plan(p: View, data: Path, state_template: Path) -> Job:
    """The ``Job`` of the stage's params and the training split at ``data``."""
    split, labels = training_split(data, p.conditioning)
    _, channels, size, _ = split.images.shape
    classes = list(split.classes) if labels is not None else []
    spec = ModelSpec(unet=p.model, image_size=size, channels=channels, schedule=p.schedule,
                     timesteps=p.timesteps, prediction=p.prediction, variance=p.variance,
                     conditioning=p.conditioning, num_classes=len(classes), classes=classes)
    p.model.validate(size)  # the network fits these images
    training = training_config(p, split.images, labels)
    fp = fingerprint(training)
    objective = {"loss": p.loss, "hybrid_lambda": p.hybrid_lambda, "timestep_sampling": p.timestep_sampling,
                 **({"cond_drop": p.cond_drop} if labels is not None else {})}
    config = {"model": spec.to_dict(), "train": asdict(p.train), "seed": p.seed, "objective": objective,
              "training": training, "fingerprint": fp}
    dataset = {"name": f"{split.dataset or 'data'}-train", "source": str(data if data.is_absolute() else repo_root() / data),
               "sha256": training["data.sha256"], "shape": training["data.shape"]}
    return Job(p, split.images, labels, spec, config, state_file(state_template, fp), dataset)


def build(job: Job, world, dev) -> tuple:
    """(U-Net, its training state, diffusion, timestep sampler): the same initial weights on every
    rank, then a dropout stream per rank."""
    torch.manual_seed(job.p.seed)
    net = job.spec.build_unet()
    state = init_state(net, job.p.train, job.p.seed, dev)
    if world.is_distributed:
        torch.manual_seed(distributed.derive_seed(job.p.seed, world.rank))
    diffusion = job.spec.build_diffusion(dev)
    return net, state, diffusion, make_timestep_sampler(job.p.timestep_sampling, job.p.timesteps, dev)


def negotiate_resume(job: Job, world, mode: str) -> tuple[dict | None, str, list[int]]:
    """Rank 0 decides whether to resume (``read_resume_file``) and readies the snapshot staging folder;
    every rank gets (training state or None, a line saying what happens, the snapshot steps already
    staged), or raises rank 0's CheckpointError."""
    found = None
    if world.is_main:
        try:
            ckpt, what = read_resume_file(job.state_path, job.config["training"], mode)
            found = ckpt, what, prepare_staging(job.staging, ckpt, job.state_path)
        except CheckpointError as e:
            found = e
    found = distributed.broadcast(found, world)
    if isinstance(found, CheckpointError):
        raise found
    return found


def begin(job: Job, world, what: str, fresh: bool) -> None:
    """Rank 0, before training: say what happens, delete what a run killed mid-write left, and the
    preview grids of an earlier run when starting fresh."""
    print(f"train: {what}" + (f" ({world.size} processes)" if world.is_distributed else ""))
    for stale in job.state_path.parent.glob(f".{job.state_path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    if fresh:
        shutil.rmtree(job.previews, ignore_errors=True)


def open_live_run(job: Job, uri: str, experiment: str, started_ms: int, ckpt: dict | None) -> LiveRun:
    """The live MLflow run, with the stage's start time: the run of the attempt a resumed training
    continues (when that logged to the same tracking URI), else a new one; params and data set first."""
    resumed = (ckpt or {}).get("mlflow") or {}
    exp_name = experiment_name()
    run = LiveRun(uri, experiment, run_name="train", start_ms=started_ms,
                  resume_run_id=resumed.get("run_id") if resumed.get("tracking_uri") == uri else None,
                  tags={**standard_tags("python -m pipeline train"), "dvc.exp_name": exp_name,
                        "dvc.stage": "train", "pipeline.training": job.config["fingerprint"]})
    run.log_params(mlflow_params(job.p._obj, KEYS))
    dataset = job.dataset
    run.log_dataset(lambda mlflow: dataset_input(training_dataset(mlflow, dataset), dataset["sha256"]))
    return run


class Recorder:
    """Training's callbacks, and what they record: every ``train.log_every`` steps the (step, learning
    rate, gradient norm) history, live MLflow metrics and, every ``train.sample_every`` steps, a
    preview grid; every ``train.checkpoint_every`` steps the resume file; every
    ``train.ema_snapshot_every`` steps the post-hoc EMA snapshots. Files and MLflow on rank 0 only."""

    def __init__(self, job: Job, world, diffusion, sampler, ckpt: dict | None, written: list[int],
                 run: LiveRun | None, uri: str):
        self.job, self.world, self.diffusion, self.sampler = job, world, diffusion, sampler
        self.run, self.uri = run, uri
        self.written = written  # snapshot steps in the staging folder (rank 0)
        # (step, learning rate, gradient norm) per logged step, beside state.losses
        self.history = [tuple(row) for row in ckpt.get("history", [])] if ckpt is not None else []
        self.saved_step = int(ckpt["step"]) if ckpt is not None else None  # of the last resume file written
        self.preview_step = max([int(f.stem.split("_")[-1]) for f in job.previews.glob("step_*.png")], default=0)

    def on_log(self, s) -> None:
        if not self.world.is_main:
            return
        step, loss = s.losses[-1]
        grad_norm = float(s.grad_norm) if s.grad_norm is not None else float("nan")
        done = {row[0] for row in self.history}
        warmup = [(k, learning_rate(s.scheduler, k)) for k in range(1, min(step, self.job.p.train.warmup_steps + 1))
                  if k not in done]  # the ramp between logged steps
        self.history += [(k, lr, None) for k, lr in warmup]
        lr = learning_rate(s.scheduler, step)
        self.history.append((step, lr, grad_norm))
        if self.run is not None:
            now = now_ms()
            if warmup:
                self.run.log_series([("lr", lr, k) for k, lr in warmup], now)
            self.run.log_metrics(step, {"loss": loss, "lr": lr, "grad_norm": grad_norm}, now)
        every, last = self.job.p.train.sample_every, self.job.p.train.steps
        if every and (step // every > self.preview_step // every or step == last):
            self.preview(s, step)

    def preview(self, s, step: int) -> None:
        """The preview grid of ``step``: a file, and the step-indexed image in MLflow."""
        path = self.job.previews / f"step_{step:07d}.png"
        preview_grid(s, self.diffusion, self.job.spec, path)
        self.preview_step = step
        if self.run is not None:
            self.run.log_image(step, path, now_ms())

    def on_start(self, s) -> None:
        """Before the first step of a fresh run: the preview of step 0 (the initial weights), so that MLflow's
        image card, which opens at step 0, shows a grid, and the previews start from noise."""
        if self.world.is_main and s.step == 0 and self.job.p.train.sample_every:
            self.preview(s, 0)

    def checkpoint(self, s) -> None:
        d = train_state_dict(s, self.world, self.sampler)  # collective: every rank's RNG states
        if self.world.is_main:
            run_id = self.run.opened_run_id() if self.run is not None else None
            mlflow_state = {"tracking_uri": self.uri, "run_id": run_id} if run_id else {}
            save_checkpoint(self.job.state_path, config=self.job.config, **d, ema_snapshots=sorted(self.written),
                            history=[list(h) for h in self.history], mlflow=mlflow_state)
            self.saved_step = s.step

    def ema_snapshot(self, s) -> None:
        if self.world.is_main:
            weights = [snapshot(averaged_weights(profile)) for profile in s.profiles]
            if not all(v.isfinite().all() for w in weights for v in w.values()):
                raise DivergedError(f"the EMA profiles are not finite in float16 at step {s.step}")
            save_snapshot(self.job.staging / snapshot_name(s.step), step=s.step,
                          sigma_rels=list(self.job.p.train.ema_profiles), weights=weights,
                          config={"model": self.job.spec.to_dict(), "fingerprint": self.job.config["fingerprint"]})
            self.written.append(s.step)

    def failed(self, e: BaseException, step: int) -> BaseException:
        """After training stopped at ``step`` on ``e``: mark the live run KILLED (Ctrl-C, SIGTERM) or FAILED
        with its end time, remove the staging folders when no resume state is beside them; the error to
        raise, saying which resume state is kept (a divergence names the last good checkpoint)."""
        if self.run is not None and not self.run.closed:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            record = self.run.finish(status, now_ms(), timeout=10)
            if record["run_id"]:
                print(f"train: MLflow run {record['run_id']} marked {status}")
        if self.world.is_main and not self.job.state_path.is_file():  # nothing to resume: no orphan folders
            shutil.rmtree(self.job.previews, ignore_errors=True)
            shutil.rmtree(self.job.staging, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            return type(e)(self.kept(step))
        if not isinstance(e, DivergedError):
            return e
        last = (f"the last good checkpoint is {self.job.state_path} at step {self.saved_step}"
                if self.saved_step is not None else "no checkpoint was written")
        return DivergedError(f"{e}; training stopped, {last}")

    def kept(self, step: int) -> str:
        """Where a stopped training stands: its step, and the resume state it left (the same command resumes)."""
        where, path = f"at step {step} of {self.job.p.train.steps}", self.job.state_path
        if self.saved_step is None or not path.is_file():
            return f"{where}; no resume state was written (train.checkpoint_every): the same command starts afresh"
        if self.saved_step == step:
            return f"{where}; its resume state is {path}: the same command resumes from step {step}"
        return (f"{where}; the last resume state is {path} at step {self.saved_step}: the same command resumes from "
                "there")


def fit(job: Job, state, diffusion, rec: Recorder, system: Path, stop) -> float:
    """Train ``state`` (recording the system metrics, with a progress bar on rank 0); the seconds it took.
    When ``stop`` asks (a SIGTERM), training ends at a step boundary with its resume state written, and
    ``Terminated`` is raised."""
    p, world = job.p, rec.world
    start = time.perf_counter()
    rec.on_start(state)
    with system_metrics.record(system, enabled=world.is_main), \
            progress(p.train.steps, "train", enabled=world.is_main, estimate=True, initial=state.step) as bar:
        train(state, diffusion, job.images, p.train, prediction=p.prediction, loss=p.loss,
              variance=p.variance, hybrid_lambda=p.hybrid_lambda, timestep_sampler=rec.sampler,
              labels=job.labels, cond_drop=p.cond_drop, world=world, progress=bar, on_log=rec.on_log,
              on_checkpoint=rec.checkpoint, on_snapshot=rec.ema_snapshot, stop=stop)
    if state.step < p.train.steps:
        raise Terminated()
    return time.perf_counter() - start


def train_and_write(job: Job, rec: Recorder, state, net, diffusion, outputs: Outputs, dev, system: Path,
                    started_ms: int) -> None:
    """Train, then (rank 0) write the outputs and print the summary. A SIGTERM is a stop at the next step
    boundary (``stop_at_safe_point``); one during the writing of the outputs lets them finish. On any
    exception the live run is closed (``Recorder.failed``) and the error says which resume state is kept."""
    first_step, world = state.step, rec.world
    try:
        with stop_at_safe_point() as stop:
            seconds = fit(job, state, diffusion, rec, system, stop)
            if world.is_main:
                record = write_outputs(rec, outputs, net, state, seconds, first_step, dev, started_ms)
    except BaseException as e:
        error = rec.failed(e, state.step)
        if error is e:
            raise
        raise error from None
    if world.is_main:
        print(summary(state, seconds, dev, world, outputs.checkpoint, rec, record))


def loss_rows(losses: list[tuple[int, float]], history: list[tuple]) -> list[tuple]:
    """(step, loss, lr, grad_norm) per logged step; lr and grad_norm empty where not recorded."""
    extra = {step: (lr, gn) for step, lr, gn in history}
    return [(step, loss, *extra.get(step, ("", ""))) for step, loss in losses]


def lr_rows(history: list[tuple]) -> list[tuple]:
    """(step, lr) of every recorded step, the warm-up's and the logged ones, by step."""
    return sorted({step: (step, lr) for step, lr, _ in history}.values())


def write_outputs(rec: Recorder, outputs: Outputs, net, state, seconds: float, first_step: int, dev,
                  started_ms: int) -> dict:
    """Rank 0, after training: the snapshots, checkpoint, loss curve, preview grids, metrics, timing
    and MLflow record (closing the live run), then the resumable files deleted; the MLflow record."""
    job, world = rec.job, rec.world
    n_params = sum(t.numel() for t in net.parameters())
    steps = sorted(rec.written)
    index = snapshot_index(job.staging, steps, job.p.train.ema_profiles, job.config["fingerprint"], SNAPSHOT_DTYPE)
    publish_snapshots(job.staging, steps, outputs.snapshots, index)
    save_checkpoint(outputs.checkpoint, step=state.step, config=job.config, model=to_cpu(net.state_dict()),
                    ema=to_cpu(state.ema.state_dict()), ema_config={"source": "train", **asdict(job.p.train.ema)},
                    timestep_sampler=rec.sampler.state_dict())
    write_csv(outputs.plot, ["step", "loss", "lr", "grad_norm"], loss_rows(state.losses, rec.history))
    write_csv(outputs.lr_plot, ["step", "lr"], [(step, f"{lr:.6g}") for step, lr in lr_rows(rec.history)])
    replace_folder(job.previews, outputs.samples)
    write_metrics(outputs.metrics, {"train": {"final_loss": round(state.losses[-1][1], 6), "final_step": state.step,
                                           "parameters": n_params}})
    trained, ended_ms = state.step - first_step, now_ms()
    write_json(outputs.timing, {"seconds": round(seconds, 2), "device": str(dev), "path": state.path,
                                "processes": world.size,
                                "resumed_from_step": first_step, "started_ms": started_ms, "ended_ms": ended_ms,
                                "images_per_second": round(trained * job.p.train.batch_size / max(seconds, 1e-9), 1)})
    record = rec.run.finish("FINISHED", ended_ms) if rec.run is not None else {
        "tracking_uri": None, "run_id": None, "complete": False, "error": "--no-live"}
    write_json(outputs.mlflow_run, {**record, "dataset": job.dataset, "params": mlflow_params(job.p._obj, KEYS)})
    job.state_path.unlink(missing_ok=True)  # finished: the outputs hold everything
    shutil.rmtree(job.previews, ignore_errors=True)
    shutil.rmtree(job.staging, ignore_errors=True)
    return record


def summary(state, seconds: float, dev, world, out: Path, rec: Recorder, record: dict) -> str:
    """What rank 0 prints at the end: steps, loss, time, and where the MLflow run is."""
    lines = [f"train: {state.step} steps, loss {state.losses[-1][1]:.4f}, {seconds:.0f} s on {dev}"
             + (f" × {world.size}" if world.is_distributed else "") + f" → {out}"]
    if rec.run is not None:
        uri = rec.uri
        link = ui_url(uri, record["experiment_id"], record["run_id"]) if record["run_id"] else None
        lines.append(f"train: MLflow run {record['run_id']} at {uri}" + (f" ({link})" if link else "")
                     if record["complete"] else f"warning: live MLflow logging incomplete ({record['error']}); "
                                                "the log stage fills in what is missing")
    return "\n".join(lines)


app = stage_app()


@app.command()
@stage
def main(params: Path = PARAMS, data: Path = typer.Option(Path("data/prepared/train.pt"), help="the training split"),
         out: Path = typer.Option(Path("models/model.pt"), help="checkpoint to write"),
         metrics: Path = typer.Option(Path("metrics/train.json"), help="final loss, steps, parameters"),
         plot: Path = typer.Option(Path("plots/train_loss.csv"), help="loss curve (step, loss, lr, grad_norm)"),
         lr_plot: Path = typer.Option(Path("plots/train_lr.csv"), help="learning rate (step, lr) from step 1"),
         timing: Path = typer.Option(Path("logs/train_timing.json"), help="wall time and throughput"),
         state: Path = typer.Option(Path(STATE), help="resumable training state, written every train.checkpoint_every "
                                                      "steps ({fingerprint}: of the training config; relative to the "
                                                      "repository root)"),
         resume: Resume = typer.Option("auto", help="auto (resume from --state when it is from the same config, "
                                                    "else start fresh) | never | require"),
         system: Path = typer.Option(Path("logs/train_system.json"), "--system-metrics",
                                     help="CPU/memory/disk/network/GPU use while training (for MLflow)"),
         snapshots: Path = typer.Option(Path("models/ema_snapshots"),
                                        help="folder for the post-hoc EMA snapshots (train.ema_profiles)"),
         samples: Path = typer.Option(Path("plots/train_samples"), help="folder of the preview grids "
                                                                         "(every train.sample_every steps)"),
         mlflow_run: Path = typer.Option(Path("logs/train_mlflow.json"), "--mlflow-run",
                                         help="where the live MLflow run is and what reached it (for the log stage)"),
         tracking_uri: str = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                          help="default: sqlite:///<repo root>/mlflow.db"),
         experiment: str = typer.Option("ddpm", envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment name"),
         live: bool = typer.Option(True, "--live/--no-live", envvar="PIPELINE_LIVE_MLFLOW",
                                   help="log to MLflow while training (loss, lr, grad norm, preview grids)"),
         device: str = DEVICE):
    """Train the diffusion U-Net (seed, schedule, prediction, timesteps, loss, variance, timestep_sampling,
    hybrid_lambda, model.*, train.*), logging to its MLflow run while it trains.

    Resumes from --state when a previous run was interrupted; under torchrun, DDP on all ranks."""
    data_parallel(device, repo_root())  # every GPU of the node (or this experiment's share): DDP
    started_ms = now_ms()
    outputs = Outputs(out, metrics, plot, lr_plot, timing, system, snapshots, samples, mlflow_run)
    p = base.load(params, "train", KEYS, diffusion, model, train_section)
    system_metrics.settings()  # a bad MLFLOW_SYSTEM_METRICS_* variable fails here, before any work
    outputs.check_writable(state_file(state, "x").parent)  # before hours of training
    job = plan(p, data, state)
    uri = tracking_uri or default_tracking_uri()
    distributed.world_from_env().shard(p.train.batch_size)  # before any work: the batch must split over the ranks
    with distributed.process_group(resolve_device(device)) as (world, dev):
        net, st, diff, sampler = build(job, world, dev)
        ckpt, what, written = negotiate_resume(job, world, Resume(resume).value)
        if ckpt is not None:
            load_train_state(st, ckpt, world, sampler)
        run = None
        if world.is_main:
            begin(job, world, what, fresh=ckpt is None)
            run = open_live_run(job, uri, experiment, started_ms, ckpt) if live else None
        rec = Recorder(job, world, diff, sampler, ckpt, written, run, uri)
        train_and_write(job, rec, st, net, diff, outputs, dev, system, started_ms)
        distributed.barrier(world)


if __name__ == "__main__":
    app()
