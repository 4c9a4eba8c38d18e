"""Command `ruler` (not a DVC stage): the ruler FIDs are measured with (``ddpm.ruler``), shown or pinned.

``python -m pipeline ruler`` prints the identity of this workspace's ruler: the extractor, the
SHA-256 of its weights (``models/classifier.pt`` for ``ddpm-classifier``) and of the reference
statistics (``data/reference/stats.pt``), and its ``id``, which every FID records.

``python -m pipeline ruler pin`` copies those files (and the classifier's metrics and the
statistics' ``info.json``) into ``rulers/<extractor>-<id>/`` with ``ruler.json``, adds the folder
to DVC (``dvc add``, so that it is kept in DVC's cache and pushed with the rest), and says which
param to set: with ``fid.ruler: rulers/<extractor>-<id>`` the `classifier` and `fid_ref` stages
copy the pinned files instead of computing new ones, so every later FID of the project, whatever
the code, is measured with that ruler. The folder's name carries its id: a new ruler is a new
folder, and ``read_pinned`` refuses a folder whose files were changed.
"""

import json
import subprocess
import sys
from pathlib import Path

import typer

from ddpm.files import file_sha256
from ddpm.ruler import PINNED, PINNED_FILES, identity, weights_file
from pipeline.outputs import check_writable, read_json, write_atomic, write_json
from pipeline.params import base, fid
from pipeline.stages._cli import one_line, stage_app

CLASSIFIER, REFERENCE = Path("models/classifier.pt"), Path("data/reference")


def current(params: Path, classifier: Path, reference: Path) -> dict:
    """The identity of the ruler of this workspace's files, and the files: {"ruler", "files": role → path}."""
    f = base.load(params, "ruler", ["fid.extractor", "fid.weights_path"], fid).fid
    stats = reference / "stats.pt"
    if not stats.is_file():
        raise FileNotFoundError(f"{stats} does not exist: run the fid_ref stage (dvc repro fid_ref)")
    weights = weights_file(f.extractor, f.weights_path, classifier)
    files = {"reference": stats, "reference_info": reference / "info.json"}
    if f.extractor == "ddpm-classifier":
        files |= {"weights": weights, "classifier_metrics": Path("metrics/classifier.json")}
    ruler = identity(f.extractor, None if weights is None else file_sha256(weights), file_sha256(stats))
    return {"ruler": ruler, "files": files}


def pin(params: Path, classifier: Path, reference: Path, out: Path | None) -> Path:
    """Copy this workspace's ruler into its own folder with ``ruler.json``; the folder."""
    now = current(params, classifier, reference)
    ruler = now["ruler"]
    folder = out or Path("rulers") / f"{ruler['extractor']}-{ruler['id']}"
    missing = [str(p) for p in now["files"].values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: run the pipeline (dvc repro) before pinning its ruler")
    check_writable(*(folder / PINNED_FILES[role] for role in now["files"]), folder / "ruler.json")
    folder.mkdir(parents=True, exist_ok=True)
    for role, path in now["files"].items():
        write_atomic(folder / PINNED_FILES[role], path.read_bytes())
    record = {"format": PINNED, "ruler": ruler, "extractor": ruler["extractor"],
              "weights_sha256": ruler["weights_sha256"],
              "files": {role: file_sha256(folder / PINNED_FILES[role]) for role in now["files"]},
              "reference_key": {k: v for k, v in read_json(now["files"]["reference_info"]).items()
                                if k in ("data_sha256", "split", "extractor", "weights_sha256", "resolution")}}
    write_json(folder / "ruler.json", record)
    return folder


app = stage_app(invoke_without_command=True,
                help="The ruler FIDs are measured with (extractor, weights, reference statistics): shown, or pinned "
                     "for a long project. Not a DVC stage.")
PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file to read (fid.extractor, fid.weights_path)")


@app.callback()
def show(ctx: typer.Context, params: Path = PARAMS):
    """Print the identity of this workspace's ruler (what every FID records)."""
    if ctx.invoked_subcommand is None:
        ruler = one_line(current)(params, CLASSIFIER, REFERENCE)["ruler"]
        typer.echo(json.dumps(ruler, indent=2))


@app.command("pin")
def pin_command(params: Path = PARAMS,
                out: Path = typer.Option(None, help="the folder (default: rulers/<extractor>-<id>)"),
                dvc_add: bool = typer.Option(True, "--dvc-add/--no-dvc-add", help="add the folder to DVC (dvc add)")):
    """Copy this workspace's ruler into rulers/<extractor>-<id>/ (with ruler.json), add it to DVC, and say
    which param pins it (fid.ruler)."""
    folder = one_line(pin)(params, CLASSIFIER, REFERENCE, out)
    if dvc_add:
        r = subprocess.run([sys.executable, "-m", "dvc", "add", str(folder)], capture_output=True, text=True)
        if r.returncode:
            typer.echo(f"warning: dvc add {folder} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}; "
                       "add it to DVC (or git) yourself", err=True)
    typer.echo(f"ruler pinned in {folder}. Set fid.ruler: {folder.as_posix()} in params.yaml (and commit it with "
               f"{folder.as_posix()}.dvc): from then on every FID is measured with this ruler.")
