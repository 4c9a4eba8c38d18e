"""Stage `check`: the first stage of the pipeline; every other stage depends on its output.

It validates the whole of params.yaml (``pipeline.params.schema``), that the data set's files are
where ``data.root`` says and in their format (IDX headers; CIFAR-10 batches read as `prepare`
reads them, so a crafted pickle is refused here too), ``fid.weights_path`` and ``fid.ruler`` when
set, and that every output declared in dvc.yaml can be written. DVC deletes a stage's outputs
just before it runs the stage's command, so a bad value (``dvc exp run -S +model.chh=3``, a
read-only ``models/``) must fail here, in a stage that runs first, before DVC has removed anything
another stage produced. (``dvc exp run`` itself deletes the outputs of matrix cells that a changed
``sample.*`` removes before any stage runs: ``python -m pipeline exp-run`` runs these checks on the
params with the ``-S`` overrides applied first; see ``pipeline.experiments.exp_run``.)

The output (``--out``) only says that the checks passed: it is the same for every valid
params.yaml, so a valid change of params still re-runs only the stages that declare the
changed keys. The stage runs on every ``dvc repro`` (always_changed: the data and the
output folders can change while params.yaml does not), and its output persists (DVC does
not delete it first), so a failed check leaves it as it was. ``--started`` (read by `log`
alone) records when this pipeline run started: the start of its MLflow parent run.
"""

import time
from pathlib import Path

import typer
import yaml

from ddpm.data import DataError
from ddpm.datasets import check_files, check_source
from ddpm.ruler import read_pinned
from pipeline import yamlio
from pipeline.outputs import check_writable, write_json
from pipeline.params.schema import Params, load_params
from pipeline.stages._cli import PARAMS, stage, stage_app
from pipeline.workspace import repo_root

PASSED = {"params": "valid", "data": "present or downloadable", "outputs": "writable"}
KEYS = ["params.yaml:"]  # all of it

app = stage_app()


def declared_outputs(dvc_yaml: Path) -> tuple[list[Path], list[Path]]:
    """(files, folders) that the stages of ``dvc_yaml`` write. A templated path
    (``samples/${item.sampler}-${item.steps}``) stands for the folder its fixed part names."""
    try:
        stages = (yamlio.load(dvc_yaml.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read the stages in {dvc_yaml}: {e}") from None
    files, folders = [], []
    for spec in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind) or []:
                name = next(iter(entry)) if isinstance(entry, dict) else str(entry)
                path = dvc_yaml.parent / name  # paths in dvc.yaml are relative to its folder
                if "${" in name:
                    folders.append(dvc_yaml.parent / (name.split("${")[0].rsplit("/", 1)[0] or "."))
                elif path.is_dir() or (not path.exists() and not path.suffix):
                    folders.append(path)
                else:
                    files.append(path)
    return files, folders


def verify(params: Params, dvc_yaml: Path) -> tuple[list[Path], list[Path]]:
    """Every check but that of params.yaml itself (``params`` is already valid): the data set's files
    are there and in their format, ``fid.weights_path`` and a pinned ``fid.ruler`` are sound, and every
    output of ``dvc_yaml`` can be written. Returns those outputs, (files, folders)."""
    cache = repo_root() / "data" / "raw"
    check_source(params.data.name, params.data.root, cache, params.data.download)
    check_files(params.data.name, params.data.root, cache)
    if params.fid.extractor == "inception-v3-compat" and params.fid.weights_path is not None \
            and not Path(params.fid.weights_path).is_file():
        raise DataError(f"fid.weights_path {params.fid.weights_path} does not exist")
    if params.fid.ruler is not None:
        pinned = read_pinned(Path(params.fid.ruler))
        if pinned["extractor"] != params.fid.extractor:
            raise DataError(f"fid.ruler {params.fid.ruler} is a {pinned['extractor']} ruler, fid.extractor is "
                            f"{params.fid.extractor}")
    files, folders = declared_outputs(dvc_yaml)
    check_writable(*files, folders=folders)
    return files, folders


@app.command()
@stage
def main(params: Path = PARAMS,
         dvc_yaml: Path = typer.Option(Path("dvc.yaml"), "--dvc-yaml", help="the stages whose outputs must be writable"),
         out: Path = typer.Option(Path("logs/check.json"), help="written when every check passed"),
         started: Path = typer.Option(None, help="also write the time this pipeline run started here")):
    """Validate params.yaml, the data set's files and that every output is writable (the first stage)."""
    started_ms = int(time.time() * 1000)
    p = load_params(params)
    files, folders = verify(p, dvc_yaml)
    check_writable(out, *([started] if started else []))
    write_json(out, PASSED)
    if started is not None:  # when this pipeline run started (the parent run's start time in MLflow)
        write_json(started, {"started_ms": started_ms})
    print(f"check: {params} is valid, {p.data.name} is in {p.data.root} (or downloadable), "
          f"{len(files) + len(folders)} outputs of {dvc_yaml} are writable")


if __name__ == "__main__":
    app()
