"""The command line: ``python -m pipeline <stage> [options]`` (or the console script
``ddpm-pipeline <stage>``, which ``make`` installs), one command per DVC stage.

Heavy imports (torch, mlflow, torch-fidelity) happen inside the commands so that
``--help`` stays instant. Expected failures (bad params, missing or corrupt files)
print one line naming the key or file and exit with status 1; ``--debug`` (or
``DDPM_DEBUG=1``) lets their traceback through instead. ``--version`` prints the version.
"""

import functools
import re
import sys
from enum import Enum
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stages of the DDPM experiment pipeline (see dvc.yaml).")

DEBUG = {"on": False}  # set by --debug: clear_errors lets the traceback through


def version() -> str:
    """The installed package's version, or pyproject.toml's in a checkout that is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("ddpm-pipeline")
    except importlib.metadata.PackageNotFoundError:
        import tomllib

        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ddpm-pipeline {version()}")
        raise typer.Exit()


VERSION = typer.Option(False, "--version", callback=_print_version, is_eager=True, expose_value=False,
                       help="print the version and exit")
DEBUG_OPTION = typer.Option(False, "--debug", envvar="DDPM_DEBUG",
                            help="show the traceback of an expected error instead of its one-line message")


@app.callback()
def _process(debug: bool = DEBUG_OPTION, _version: bool = VERSION) -> None:
    """Before any command: the allocator keeps freed memory (``common.keep_freed_memory``), compiled
    kernels are cached for every stage process (``common.share_compile_cache``), and a fast path that
    falls back says so in one line (``common.one_line_warnings``)."""
    from pipeline.common import keep_freed_memory, one_line_warnings, share_compile_cache

    DEBUG["on"] = debug
    keep_freed_memory()
    share_compile_cache()
    one_line_warnings()


def device_name(value: str) -> str:
    """The --device value, checked by the parser: auto, cpu, cuda or cuda:N (else a usage error)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


class Resume(str, Enum):
    """train --resume: what to do with the resumable state (--state) a previous run left."""
    auto = "auto"  # resume from --state when it is from the same config, else start fresh
    never = "never"  # always start fresh (the file is overwritten at the first checkpoint)
    require = "require"  # fail unless --state exists and is from the same config


PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file to read")
DEVICE = typer.Option("auto", "--device", parser=device_name, metavar="[auto|cpu|cuda|cuda:N]",
                      help="auto (CUDA when present), cpu, cuda or cuda:N")
EMA_CHECKPOINT = typer.Option(Path("models/model_ema.pt"))  # the ema stage's output
TEST_SPLIT = typer.Option(Path("data/prepared/test.pt"), help="the test split")


def clear_errors(fn):
    """Turn the project's own errors (``ddpm.errors.DDPMError``) and a missing file into a one-line
    message and exit status 1 (unless --debug); any other exception keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if DEBUG["on"]:
            return fn(*args, **kwargs)
        from ddpm.errors import DDPMError

        try:
            return fn(*args, **kwargs)
        except (DDPMError, FileNotFoundError) as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(1)
        except (OSError, RuntimeError) as e:  # a full disk is no bug: one line, wherever it struck
            from ddpm.files import disk_full, disk_full_cause

            cause = disk_full_cause(e)
            if cause is None:
                raise
            line = disk_full(cause.filename, None, cause) if cause.filename else f"an output could not be written: {cause}"
            typer.echo(f"error: {line}", err=True)
            sys.exit(1)

    return wrapper


@app.command()
@clear_errors
def check(params: Path = PARAMS, dvc_yaml: Path = typer.Option(Path("dvc.yaml"), "--dvc-yaml",
                                                               help="the stages whose outputs must be writable"),
          out: Path = typer.Option(Path("logs/check.json"), help="written when every check passed"),
          started: Path = typer.Option(None, help="also write the time this pipeline run started here")):
    """Validate params.yaml, the data set's files and that every output is writable (the first stage)."""
    from pipeline import check as stage

    stage.main(params, dvc_yaml, out, started)


@app.command()
@clear_errors
def prepare(params: Path = PARAMS,
            out: Path = typer.Option(Path("data/prepared"), help="folder for train.pt, test.pt, info.json")):
    """Read the data set (data.*) and write its train/test splits."""
    from pipeline import prepare as stage

    stage.main(params, out)


@app.command()
@clear_errors
def classifier(params: Path = PARAMS, data: Path = typer.Option(Path("data/prepared"), help="prepared data folder"),
               out: Path = typer.Option(Path("models/classifier.pt")),
               metrics: Path = typer.Option(Path("metrics/classifier.json")), device: str = DEVICE,
               timing: Path = typer.Option(Path("logs/classifier_timing.json"), help="when it ran (for MLflow)")):
    """Train the feature-extractor classifier used for offline FID (classifier.*)."""
    from pipeline import classifier as stage

    stage.main(params, data, out, metrics, device, timing)


@app.command()
@clear_errors
def train(params: Path = PARAMS, data: Path = typer.Option(Path("data/prepared/train.pt")),
          out: Path = typer.Option(Path("models/model.pt"), help="checkpoint to write"),
          metrics: Path = typer.Option(Path("metrics/train.json")),
          plot: Path = typer.Option(Path("plots/train_loss.csv"), help="loss curve (step, loss, lr, grad_norm)"),
          lr_plot: Path = typer.Option(Path("plots/train_lr.csv"), help="learning rate (step, lr) from step 1"),
          timing: Path = typer.Option(Path("logs/train_timing.json"), help="wall time and throughput"),
          state: Path = typer.Option(Path("checkpoints/train-{fingerprint}.pt"),
                                     help="resumable training state, written every train.checkpoint_every steps "
                                          "({fingerprint}: of the training config; relative to the repository root)"),
          resume: Resume = typer.Option(Resume.auto, help="auto (resume from --state when it is from the same config, "
                                                          "else start fresh) | never | require"),
          system_metrics: Path = typer.Option(Path("logs/train_system.json"), "--system-metrics",
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
    from pipeline import train as stage

    stage.main(params, data, out, metrics, plot, timing, device, state, resume, system_metrics,
               snapshots, samples, mlflow_run, tracking_uri, experiment, live, lr_plot)


@app.command()
@clear_errors
def ema(params: Path = PARAMS, checkpoint: Path = typer.Option(Path("models/model.pt"), help="train's checkpoint"),
        snapshots: Path = typer.Option(Path("models/ema_snapshots"), help="train's EMA snapshots"),
        out: Path = typer.Option(Path("models/model_ema.pt"), help="checkpoint for sample, nll and denoise"),
        metrics: Path = typer.Option(Path("metrics/ema.json"), help="which average, and the fit of a post-hoc one")):
    """Choose the average of the weights (ema.sigma_rel): train's own EMA, or EDM2's post-hoc EMA."""
    from pipeline import ema as stage

    stage.main(params, checkpoint, snapshots, out, metrics)


@app.command()
@clear_errors
def sample(params: Path = PARAMS, checkpoint: Path = EMA_CHECKPOINT,
           sampler: str = typer.Option(..., help="a sampler name defined under 'samplers' in params"),
           steps: int = typer.Option(..., help="number of sampling steps"),
           out: Path = typer.Option(..., help="folder for samples.pt, grid.png, strip.png, info.json, system.json"),
           guidance: str = typer.Option(None, help="a classifier-free guidance setting defined under 'guidance' "
                                                   "(class-conditional models; default: none, w = 0)"),
           device: str = DEVICE):
    """Sample one cell of the sampler × steps (× guidance) matrix (sample.*, samplers.<name>, guidance.<name>);
    sample.weights: ema | raw."""
    from pipeline import sample as stage

    stage.main(params, checkpoint, sampler, steps, out, device, guidance)


@app.command("fid-ref")
@clear_errors
def fid_ref(params: Path = PARAMS, reference: Path = typer.Option(Path("data/prepared/test.pt"), help="reference split"),
            classifier: Path = typer.Option(Path("models/classifier.pt"), help="weights of the ddpm-classifier extractor"),
            out: Path = typer.Option(Path("data/reference"), help="folder for stats.pt and info.json"),
            device: str = DEVICE):
    """Features and mean/covariance of the reference split, once per extractor (fid.extractor, ...)."""
    from pipeline import fid_ref as stage

    stage.main(params, reference, classifier, out, device)


@app.command("fid-floor")
@clear_errors
def fid_floor(params: Path = PARAMS, real: Path = typer.Option(Path("data/prepared/train.pt"),
                                                              help="real images (a prepared split)"),
              reference: Path = typer.Option(Path("data/reference/stats.pt"), help="reference statistics (fid-ref)"),
              classifier: Path = typer.Option(Path("models/classifier.pt"),
                                              help="weights of the ddpm-classifier extractor"),
              out: Path = typer.Option(Path("metrics/fid_floor.json"), help="the floor's metrics"),
              device: str = DEVICE):
    """The real-data floor: sample.num_samples real images (drawn with sample.seed) against the reference (fid.*)."""
    from pipeline import fid_floor as stage

    stage.main(params, real, reference, classifier, out, device)


@app.command()
@clear_errors
def fid(params: Path = PARAMS, samples: Path = typer.Option(..., help="samples.pt of one cell"),
        reference: Path = typer.Option(Path("data/reference/stats.pt"), help="reference statistics (fid-ref)"),
        classifier: Path = typer.Option(Path("models/classifier.pt"), help="weights of the ddpm-classifier extractor"),
        out: Path = typer.Option(..., help="metrics JSON of the cell"), device: str = DEVICE):
    """FID, KID, precision/recall and Inception Score of one cell against the reference (fid.*)."""
    from pipeline import fid as stage

    stage.main(params, samples, reference, classifier, out, device)


@app.command()
@clear_errors
def nll(params: Path = PARAMS, checkpoint: Path = EMA_CHECKPOINT, data: Path = TEST_SPLIT,
        metrics: Path = typer.Option(Path("metrics/nll.json"), help="bits/dim and its parts"),
        plot: Path = typer.Option(Path("plots/nll_terms.csv"), help="mean bound term per timestep (t, bits_per_dim)"),
        device: str = DEVICE):
    """NLL of the test split in bits/dim from the full variational bound (nll.*; nll.weights: ema | raw)."""
    from pipeline import nll as stage

    stage.main(params, checkpoint, data, metrics, plot, device)


@app.command()
@clear_errors
def denoise(params: Path = PARAMS, checkpoint: Path = EMA_CHECKPOINT, data: Path = TEST_SPLIT,
            metrics: Path = typer.Option(Path("metrics/denoise.json"), help="MSE of the raw, EMA and untrained weights"),
            plot: Path = typer.Option(Path("plots/denoise_by_timestep.csv"),
                                      help="the MSE of each network per timestep of the grid"),
            device: str = DEVICE):
    """Held-out denoising MSE (ε) of the raw, EMA and untrained weights, side by side (denoise.*)."""
    from pipeline import denoise as stage

    stage.main(params, checkpoint, data, metrics, plot, device)


@app.command()
@clear_errors
def report(params: Path = PARAMS, cells: Path = typer.Option(Path("metrics/cells")),
           metrics: Path = typer.Option(Path("metrics/fid.json")),
           plot: Path = typer.Option(Path("plots/fid_vs_steps.csv")),
           figure: Path = typer.Option(Path("reports/fid_vs_steps.png")),
           markdown: Path = typer.Option(Path("reports/report.md")),
           html: Path = typer.Option(Path("reports/report.html"), help="self-contained HTML report"),
           classifier_metrics: Path = typer.Option(Path("metrics/classifier.json"), help="extractor test accuracy"),
           loss: Path = typer.Option(Path("plots/train_loss.csv"), help="training loss curve (step, loss)"),
           loss_figure: Path = typer.Option(Path("reports/train_loss.png")),
           samples: Path = typer.Option(Path("samples"), help="folder of the cells' grid.png and strip.png"),
           ema_metrics: Path = typer.Option(Path("metrics/ema.json"), help="which average the ema stage chose"),
           sigma_plot: Path = typer.Option(Path("plots/fid_vs_sigma_rel.csv"),
                                           help="(sampler, steps, sigma_rel, fid) per cell, for dvc plots diff"),
           sweep_plot: Path = typer.Option(Path("plots/guidance_sweep.csv"),
                                           help="one row per cell and guidance weight w (FID, precision, recall, "
                                                "class accuracy)"),
           sweep_figure: Path = typer.Option(Path("reports/guidance_sweep.png")),
           floor: Path = typer.Option(Path("metrics/fid_floor.json"), help="the real-data floor (fid-floor)"),
           nll_metrics: Path = typer.Option(Path("metrics/nll.json"), help="bits/dim for the header (nll)"),
           denoise_metrics: Path = typer.Option(Path("metrics/denoise.json"),
                                                help="the denoising MSE for the header (denoise)")):
    """Collect the cells into metrics/fid.json, the FID-vs-steps and guidance-sweep plots and the markdown + HTML
    report."""
    from pipeline import report as stage

    stage.main(params, cells, metrics, plot, figure, markdown, html, classifier_metrics, loss, loss_figure, samples,
               ema_metrics, sigma_plot, sweep_plot, sweep_figure, floor, nll_metrics, denoise_metrics)


@app.command()
@clear_errors
def log(params: Path = PARAMS, tracking_uri: str = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                                                 help="default: sqlite:///<repo root>/mlflow.db"),
        experiment: str = typer.Option("ddpm", envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment name "
                                                                                     "(and registered model)")):
    """Log this pipeline run to MLflow: params, metrics, loss curve, grids, plots, the model."""
    from pipeline import log as stage

    stage.main(params, tracking_uri, experiment)


@app.command()
@clear_errors
def sync(to: str = typer.Option(None, "--to", help="log every waiting run to this tracking URI instead of "
                                                  "the one it was meant for")):
    """Log the runs the log stage could not reach MLflow for (kept in .mlflow-outbox/), each to the
    tracking URI it was meant for (or all to --to); not a DVC stage."""
    from pipeline import log as stage

    stage.sync(to)


@app.command()
@clear_errors
def compare(exp_json: Path = typer.Option(None, "--exp-json", help="a saved `dvc exp show --json` (default: run it)"),
            rows: str = typer.Option("schedule", help="param (dotted key) for the table's rows"),
            columns: str = typer.Option("prediction", help="param (dotted key) for the table's columns"),
            extra: list[str] = typer.Option([], "--param", help="more params to show per experiment (repeatable)"),
            out: Path = typer.Option(None, help="also write the tables to this markdown file (and rows as .json)"),
            commits: str = typer.Option("head", help="head: experiments of HEAD; all: of every commit"),
            sigma_rel_figure: Path = typer.Option(None, "--sigma-rel-figure",
                                                  help="also plot FID against the EMA length sigma_rel over the "
                                                       "experiments (a PNG) and tabulate it"),
            sigma_rel_steps: int = typer.Option(None, "--sigma-rel-steps",
                                                help="sampling steps of that plot (default: the most in the sweep)")):
    """Ablation table across DVC experiments: best FID (and bits/dim) per rows × columns param values.
    Not a DVC stage: it reads every experiment."""
    from pipeline import compare as stage

    stage.main(exp_json, rows, columns, extra, out, commits, sigma_rel_figure, sigma_rel_steps)


@app.command("exp-run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@clear_errors
def exp_run(ctx: typer.Context):
    """`dvc exp run ARGS` (pass DVC's arguments: -S key=value, --queue, targets, ...), once params.yaml with
    the -S overrides applied passes the check stage's checks. `dvc exp run` deletes the outputs of sample
    matrix cells that a -S removes before any stage runs, so a typo there (an unknown sampler in sample.samplers,
    a step count beyond timesteps) would cost results; here it fails first, with one line. Not a DVC stage."""
    from pipeline import exp_run as command

    sys.exit(command.main(list(ctx.args)))


study_app = typer.Typer(no_args_is_help=True, help="A study: experiments × seeds as DVC experiments, and claims about "
                                                      "them judged over the seeds (see pipeline/study.py). Not a DVC stage.")
app.add_typer(study_app, name="study")
STUDY_FILE = typer.Argument(..., help="the study file, e.g. studies/papers.yaml")
TRACKING_URI = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="default: sqlite:///<repo root>/mlflow.db")
MLFLOW_EXPERIMENT = typer.Option("ddpm", envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment name")


@study_app.command(name="run")
@clear_errors
def study_run(study: Path = STUDY_FILE,
              jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="queue workers running experiments at once"),
              poll: float = typer.Option(10.0, min=0.1, help="seconds between looks at the queue"),
              dry: bool = typer.Option(False, "--dry", help="say what is done and what would be queued; queue nothing"),
              tracking_uri: str = TRACKING_URI, experiment: str = MLFLOW_EXPERIMENT):
    """Queue every experiment × seed of the study that no experiment has done yet (the same params and
    code) with `dvc exp run --queue`, run the queue with -j workers and follow it. Every run's params pass
    the check stage's checks first; a bad study file is one line and queues nothing."""
    from pipeline import study as command

    command.run_main(study, jobs, poll, tracking_uri, experiment, dry)


@study_app.command(name="report")
@clear_errors
def study_report(study: Path = STUDY_FILE,
                 out: Path = typer.Option(Path("reports"), help="folder of study-<name>.{md,html,json} and the figure"),
                 readme: Path = typer.Option(None, help="also regenerate the study's section of this file "
                                                        "(between its '<!-- study <name>: begin' and end lines)"),
                 tracking_uri: str = TRACKING_URI, experiment: str = MLFLOW_EXPERIMENT):
    """Mean ± std per experiment and cell, each claim's difference of means with its 95% Welch interval and
    verdict (holds, reversed, not established), FID vs steps with error bars; logged to MLflow as one
    parent run holding the experiments' runs."""
    from pipeline import study as command

    command.report_main(study, out, readme, tracking_uri, experiment)


@app.command()
@clear_errors
def export(checkpoint: Path = typer.Option(Path("models/model.pt"), help="a checkpoint the train stage wrote"),
           out: Path = typer.Option(Path("exported"), help="folder for the diffusers pipeline (unet/, scheduler/)"),
           weights: str = typer.Option("ema", help="ema | raw")):
    """Export a trained model to diffusers: UNet2DModel + DDPMScheduler as safetensors, for
    DDPMPipeline / DDIMPipeline.from_pretrained(out). Not a DVC stage."""
    from pipeline import export as command

    command.main(checkpoint, out, weights)


def main() -> None:
    """The console script ``ddpm-pipeline``."""
    app()


if __name__ == "__main__":
    main()
