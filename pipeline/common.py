"""Small helpers shared by the stage commands: devices, files, progress, repo root."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from ddpm.checkpoint import atomic_write


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return torch.device(device)


class OutputError(ValueError):
    """An output cannot be written where it is asked for."""


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


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (has the stage that writes it run?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def write_image_grid(path, images: torch.Tensor, nrow: int) -> None:
    """uint8 images [N, C, H, W] as one PNG grid, ``nrow`` images per row, written atomically."""
    import io

    from torchvision.utils import save_image

    png = io.BytesIO()
    save_image(images.float() / 255.0, png, format="png", nrow=nrow, padding=2)
    write_atomic(path, png.getvalue())


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


def write_csv(path, header: list[str], rows) -> None:
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    write_atomic(path, "\n".join(lines) + "\n")


class _Lines:
    """Off a terminal, each tqdm redraw ('\\r' + bar) becomes one line of the log."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar that stays readable in logs: off a terminal, one line at most every 10 s
    (``enabled=False``: silent, for the ranks other than 0)."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, mininterval=0.5 if interactive else 10.0, dynamic_ncols=interactive,
               ascii=not interactive, disable=not enabled, file=sys.stderr if interactive else _Lines(sys.stderr))
    try:
        yield bar.update
    finally:
        bar.close()


def repo_root() -> Path:
    """The project root: DVC_ROOT for stages (mapped back out of DVC's temporary
    experiment workspaces under .dvc/tmp/exps), else the working directory."""
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def git_revision(cwd=None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
