"""A stage's files: checked writable before any work, then written atomically (JSON, DVC metrics,
CSV), and read back with one clear line when missing or malformed. JSON is always valid JSON: a NaN
or infinite number is refused (``NonFiniteError`` naming the file and the key) and nothing is
written, where ``json.dumps`` would write a bare ``NaN`` that no JSON reader accepts."""

import json
import math
import os
from pathlib import Path

from ddpm.errors import InputError, NonFiniteError
from ddpm.files import atomic_write
from pipeline.errors import OutputError


def check_writable(*paths, folders=()) -> None:
    """Before any work: raise ``OutputError`` unless each of ``paths`` (files) and ``folders``
    can be written, i.e. its nearest existing ancestor is a writable folder, nothing in its
    way is a file, and a file is not a folder (or a folder a file). Creates nothing."""
    for path, is_folder in [(Path(p), False) for p in paths] + [(Path(p), True) for p in folders]:
        if path.exists() and path.is_dir() != is_folder:
            raise OutputError(f"cannot write {path}: it is a {'file' if is_folder else 'folder'}, "
                              f"expected a {'folder' if is_folder else 'file'}")
        where = path if is_folder and path.is_dir() else path.parent
        existing = where
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"cannot write {path}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {path}: {existing} is not writable (permission denied)")


def write_atomic(path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path``, then rename over it."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_write(path, lambda f: f.write(payload))


def non_finite_keys(obj, prefix: str = "") -> list[str]:
    """The dotted keys (``floor.isc_mean``, ``runs.3.fid``) of the NaN or infinite numbers in ``obj``."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix or "(the value)"]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [k for key, v in items for k in non_finite_keys(v, f"{prefix}.{key}" if prefix else str(key))]


def dumps(path, obj, **kwargs) -> str:
    """``json.dumps(obj)`` as valid JSON; ``NonFiniteError`` naming ``path`` and each key whose number is NaN or ∞."""
    bad = non_finite_keys(obj)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{path}: not written, {shown} {'is' if len(bad) == 1 else 'are'} not finite "
                             f"(NaN or infinite: no valid JSON number, and no meaningful result)")
    return json.dumps(obj, allow_nan=False, **kwargs) + "\n"


def write_json(path, obj) -> None:
    write_atomic(path, dumps(path, obj, indent=2, sort_keys=True))


def write_metrics(path, obj: dict) -> None:
    """A DVC metrics file: one block named for what it measures (``{"nll": {"bits_per_dim": …}}``, so
    that `dvc exp show` names its columns ``nll.bits_per_dim``), keys in the order given, which is
    the order of those columns."""
    write_atomic(path, dumps(path, obj, indent=2))


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (has the stage that writes it run?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def write_csv(path, header: list[str], rows) -> None:
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    write_atomic(path, "\n".join(lines) + "\n")


def read_losses(path) -> list[tuple[int, float]]:
    """The loss curve the train stage writes (``step,loss`` CSV); [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines()[1:]:
        step, loss = line.split(",")[:2]
        rows.append((int(step), float(loss)))
    return rows
