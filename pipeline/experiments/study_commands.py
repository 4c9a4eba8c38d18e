"""The study commands (not DVC stages): ``python -m pipeline study run <file>`` queues and follows a
study's runs (``pipeline.experiments.study_queue``), ``python -m pipeline study report <file>``
reports them (``pipeline.experiments.study_report``); the study file itself is
``pipeline.experiments.study``."""

import shlex
from pathlib import Path

import typer

from pipeline.experiments.study import StudyError, baselines, check, load, match, plan, row
from pipeline.outputs import check_writable
from pipeline.stages._cli import one_line, stage_app


EXECUTORS = ("local", "slurm")  # DVC's local queue, or one SLURM job per run (pipeline.experiments.slurm)


def run_main(study_path: Path, jobs: int, poll: float, tracking_uri: str | None, experiment: str,
             dry: bool = False, yes: bool = False, executor: str = "local", resources: dict | None = None) -> None:
    """Say how many runs the study has (at once) and how many it would queue; refuse more than its limit
    (``Study.too_many``) unless ``yes``; ``dry`` queues nothing (and says when a real run would need --yes).
    ``executor``: DVC's local queue, or one SLURM job per run with ``resources`` over the study file's."""
    from pipeline.experiments import dvc_api, study_queue

    if executor not in EXECUTORS:
        raise StudyError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    study = plan(study_path)
    print(f"study {study.name}: {study.size()}; checking their params", flush=True)
    check(study)
    done = match(study, study_queue.exp_show(), study_queue.current_check())
    pending = dvc_api.queued() if executor == "local" else {}
    todo = [r for r in study.runs if r.name not in done and r.name not in pending]
    print(f"study {study.name}: {study.size()}: {len(done)} done, {sum(r.name in pending for r in study.runs)} "
          f"queued or running, {len(todo)} to queue", flush=True)
    for r in study.runs:
        if r.name in done:
            name, rev, _ = done[r.name]
            print(f"  {r.name}: done (DVC experiment {name}, {rev[:7]})")
    if not todo and not any(r.name in pending for r in study.runs):
        print(f"study {study.name}: nothing to run")
        return
    too_many = None if yes else study.too_many(len(todo))
    if dry:
        print("\n".join(f"  {r.name}: would queue: dvc exp run --queue -n {r.name} "
                        + shlex.join(a for o in r.overrides for a in ("-S", o)) for r in todo))
        if too_many:
            print(f"study {study.name}: a real run would refuse: {too_many}")
        return
    if too_many:
        raise StudyError(f"{study_path}: {too_many}")
    if executor == "slurm":
        from pipeline.experiments import slurm

        asked = {k: v for k, v in (resources or {}).items() if v is not None}
        slurm.run(study, todo, slurm.Resources(**{**study.slurm, **asked}), poll, tracking_uri, experiment)
        return
    study_queue.run(study, todo, [r for r in study.runs if r.name in pending], jobs, poll, tracking_uri, experiment)


def report_main(study_path: Path, out_dir: Path, readme: Path | None, tracking_uri: str | None,
                experiment: str) -> None:
    from pipeline.experiments import study_queue, study_report
    from pipeline.tracking import study as study_mlflow

    study = load(study_path)
    if readme is not None:
        study_report.check_readme(readme, study.name)
    check_writable(*study_report.outputs(study.name, out_dir))
    exp_show = study_queue.exp_show()
    done = match(study, exp_show, study_queue.current_check())
    if not done:
        raise StudyError(f"no run of study {study.name} is done (none has its params and today's code): "
                         f"python -m pipeline study run {study_path.as_posix()}")
    rows = {name: row(*found) for name, found in done.items()}
    study_report.check_rulers(study, rows)
    doc = study_report.document(study, done, rows, baselines(exp_show))
    paths = study_report.write(doc, out_dir)
    for line in study_report.summary(doc):
        print(line)
    if readme is not None:
        command = study_report.readme_command(study_path, out_dir, readme)
        study_report.update_readme(readme, doc, command, paths[0].as_posix())
        print(f"study report: the study's section of {readme} is regenerated")
    print(f"study report: {', '.join(p.as_posix() for p in paths)}")
    study_mlflow.log(doc, paths, tracking_uri, experiment)


app = stage_app(no_args_is_help=True,
                help="A study: experiments × seeds as DVC experiments, and claims about them judged over the seeds "
                     "(see pipeline/experiments/study.py). Not a DVC stage.")
STUDY_FILE = typer.Argument(..., help="the study file, e.g. studies/papers.yaml")
TRACKING_URI = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="default: sqlite:///<repo root>/mlflow.db")
MLFLOW_EXPERIMENT = typer.Option("ddpm", envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment name")


@app.command(name="run")
def run_command(study: Path = STUDY_FILE,
                jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="queue workers running experiments at once"),
                poll: float = typer.Option(10.0, min=0.1, help="seconds between looks at the queue"),
                dry: bool = typer.Option(False, "--dry", help="say what is done and what would be queued; queue "
                                                              "nothing"),
                yes: bool = typer.Option(False, "--yes", help="queue more runs than the study's limit (max_runs in "
                                                              "the study file; default 100)"),
                tracking_uri: str = TRACKING_URI, experiment: str = MLFLOW_EXPERIMENT,
                executor: str = typer.Option("local", help="local: DVC's queue on this machine (-j workers); slurm: "
                                                           "one SLURM job per run (sbatch), results pushed home as "
                                                           "DVC experiments"),
                partition: str = typer.Option(None, help="slurm: the partition (default: the study file's slurm:, "
                                                         "else SLURM's)"),
                gpus: int = typer.Option(None, min=0, help="slurm: GPUs per job (--gres=gpu:N)"),
                cpus: int = typer.Option(None, min=1, help="slurm: CPUs per job (--cpus-per-task)"),
                time: str = typer.Option(None, help="slurm: time limit per job (minutes, H:MM:SS, D-HH:MM:SS)"),
                account: str = typer.Option(None, help="slurm: the account to charge")):
    """Queue every experiment × seed of the study that no experiment has done yet (the same params, and no
    stage that would run again) with `dvc exp run --queue`, run the queue with -j workers and follow it, or
    submit each as a SLURM job (--executor slurm). Every run's params pass the check stage's checks first; a
    bad study file is one line and queues nothing; more runs than the study's max_runs (default 100) are
    refused unless --yes."""
    resources = {"partition": partition, "gpus": gpus, "cpus": cpus, "time": time, "account": account}
    one_line(run_main)(study, jobs, poll, tracking_uri, experiment, dry, yes, executor, resources)


@app.command(name="report")
def report_command(study: Path = STUDY_FILE,
                   out: Path = typer.Option(Path("reports"), help="folder of study-<name>.{md,html,json} and the "
                                                                  "figure"),
                   readme: Path = typer.Option(None, help="also regenerate the study's section of this Markdown "
                                                          "file (between its '<!-- study <name>: begin' and end "
                                                          "lines), e.g. docs/results/study.md"),
                   tracking_uri: str = TRACKING_URI, experiment: str = MLFLOW_EXPERIMENT):
    """Mean ± std per experiment and cell, each claim's difference of means with its 95% Welch interval and
    verdict (holds, reversed, not established), FID vs steps with error bars; logged to MLflow as one
    parent run holding the experiments' runs."""
    one_line(report_main)(study, out, readme, tracking_uri, experiment)
