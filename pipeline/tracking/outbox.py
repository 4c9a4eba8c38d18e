"""The outbox: runs the `log` stage could not send to MLflow, waiting in
``<repo root>/.mlflow-outbox/<fingerprint>-<uri hash>/`` with what they would have logged and the
tracking URI they were meant for. ``python -m pipeline sync`` (``pipeline.commands.sync``) logs each to its own URI (``--to
URI`` sends them all elsewhere, on purpose); the `log` stage sends those waiting for its URI
whenever it reaches it. Nothing is lost, nothing is logged twice, and nothing goes to a server it
was not meant for. Not a DVC stage."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from pipeline.tracking import client as tracking
from pipeline.tracking.runs import publish
from pipeline.workspace import repo_root

OUTBOX = ".mlflow-outbox"
# What `runs.collect` reads, relative to the workspace: copied into the outbox when unreachable.
RUN_FILES = ("metrics", "plots", "reports", "logs", "models/model_ema.pt", "data/reference/info.json",
             "samples/*/info.json", "samples/*/grid.png", "samples/*/strip.png", "samples/*/system.json")


def outbox() -> Path:
    return repo_root() / OUTBOX


def entries(uri: str | None = None) -> list[Path]:
    """The runs waiting in the outbox (for ``uri`` only, when given)."""
    found = sorted(outbox().glob("*/meta.json")) if outbox().is_dir() else []
    out = []
    for meta_file in found:
        try:
            target = json.loads(meta_file.read_text()).get("tracking_uri")
        except (OSError, ValueError):
            target = None
        if uri is None or tracking.same_uri(target, uri):
            out.append(meta_file.parent)
    return out


def _remove_leftovers() -> None:
    """Temporary folders of a stash or a removal that was killed half-way (call holding the lock)."""
    for tmp in outbox().glob(".*") if outbox().is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(entry: Path) -> None:
    """Take an entry out of the outbox at once (a rename), then delete its files (call holding
    the lock; a parallel `log` may have removed it already)."""
    trash = entry.with_name(f".removed.{entry.name}")
    shutil.rmtree(trash, ignore_errors=True)  # left by a removal that was killed
    if entry.is_dir():
        entry.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def stash(params_path: Path, meta: dict) -> Path:
    """Copy the run's files into the outbox (atomically: a temporary folder renamed into place)."""
    uri_hash = hashlib.sha256(meta["tracking_uri"].encode()).hexdigest()[:8]
    entry = outbox() / f"{meta['fingerprint']}-{uri_hash}"
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tracking.lock():
        _remove_leftovers()
        return _stash(params_path, meta, entry)


def _stash(params_path: Path, meta: dict, entry: Path) -> Path:
    if entry.is_dir():
        return entry
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        for pattern in RUN_FILES:
            for src in Path(".").glob(pattern):
                dst = tmp / src
                dst.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        shutil.copy2(params_path, tmp / "params.yaml")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.rename(entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not entry.is_dir():  # not merely a parallel stage that stashed the same run first
            raise
    except BaseException:  # Ctrl-C or SIGTERM: no half-copied entry stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def flush(mlflow, uri: str, waiting: list[Path]) -> tuple[int, list[str]]:
    """Log the outbox ``waiting`` runs to ``uri``, removing each once it is in MLflow; (runs done, errors)."""
    done, errors = 0, []
    mlflow.set_tracking_uri(uri)
    for entry in waiting:
        try:
            meta = json.loads((entry / "meta.json").read_text())
            message = publish(mlflow, meta["experiment"], entry / "params.yaml", meta, root=entry)
        except Exception as e:
            errors.append(f"{entry}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            break  # the server is down, or this entry is broken: keep it for the next try
        with tracking.lock():
            _remove(entry)
        done += 1
        print(f"sync: {entry.name}: {message} at {uri}")
    return done, errors
