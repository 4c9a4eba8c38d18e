"""Small helpers shared by the stage commands: devices, files, progress, repo root."""

import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ddpm.errors import DDPMError, InputError
from ddpm.files import atomic_write


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees (no mmap per large block, no trimming),
    so that a tensor allocated again reuses warm pages instead of faulting in fresh zeroed ones.

    glibc serves blocks above its mmap threshold (128 KiB to 32 MiB, adapting) with a fresh mmap
    and returns them on free; a batch of activations is such a block, so every layer of every step
    page-faults its output in anew. On the 2-core CPU this took 45% of the CPU preset's sampling
    time (batch 400: 10.7 → 5.9 CPU-s per sample() call) and 13% of a training step (batch 64).
    The cost: a process's memory stays at its peak until it exits (stage processes are short).
    A no-op (False) where the C library has no ``mallopt`` (not glibc)."""
    import ctypes
    import ctypes.util

    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available")
    return torch.device(device)


class ExternalError(DDPMError, RuntimeError):
    """A tool outside the project (DVC, MLflow) failed; the message says what to do."""


class OutputError(InputError):
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


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": 2}`` → ``{"a.b": 1, "c": 2}``, each key under ``prefix``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes, in row-major order."""
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_metrics(path, obj: dict) -> None:
    """A DVC metrics file: one block named for what it measures (``{"nll": {"bits_per_dim": …}}``, so
    that `dvc exp show` names its columns ``nll.bits_per_dim``), keys in the order given, which is
    the order of those columns."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (has the stage that writes it run?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def write_image_grid(path, images: torch.Tensor, nrow: int, padding: int = 2) -> None:
    """uint8 images [N, C, H, W] (N ≥ 2) as one RGB PNG grid, ``nrow`` images per row with
    ``padding`` black pixels around each: torchvision's ``save_image(make_grid(...))`` layout and
    bytes (``tests/test_performance.py``), tiled here and encoded by PIL, because importing
    torchvision costs every sample cell a second or more (it loads torch._dynamo). Atomic."""
    import io

    from PIL import Image

    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = torch.zeros(rows * (h + padding) + padding, cols * (w + padding) + padding, 3, dtype=torch.uint8)
    tiles = images.expand(-1, 3, -1, -1) if c == 1 else images
    for i, tile in enumerate(tiles):
        y, x = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[y:y + h, x:x + w] = tile.permute(1, 2, 0)
    png = io.BytesIO()
    Image.fromarray(grid.numpy()).save(png, format="png")
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


def format_seconds(seconds: float) -> str:
    """``42 s``, ``7.5 min`` or ``3.2 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class Estimate:
    """Says once, after the first units of work, how long all ``total`` will take.

    The clock starts after the first update (the first step carries one-time costs: first
    allocations, torch.compile) and the rate is measured from there until ``min_seconds``
    have passed and ``min_units`` more were done."""

    def __init__(self, total: int, desc: str, write, min_seconds: float = 5.0, min_units: int = 3, clock=time.perf_counter):
        self.total, self.desc, self.write, self.clock = total, desc, write, clock
        self.min_seconds, self.min_units = min_seconds, min_units
        self.begin = clock()
        self.start = self.first = None
        self.done = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.first is None:
            self.start, self.first = self.clock(), self.done
            return
        if self.start is None or self.done >= self.total:
            return
        now = self.clock()
        units, seconds = self.done - self.first, now - self.start
        if units >= self.min_units and seconds >= self.min_seconds:
            left = (self.total - self.done) * seconds / units
            self.write(f"{self.desc}: {units / seconds:.3g} steps/s; estimated total {format_seconds(now - self.begin + left)}"
                       f" for {self.total} steps, {format_seconds(left)} to go")
            self.start = None  # said once


@contextmanager
def progress(total: int, desc: str, enabled: bool = True, estimate: bool = False, initial: int = 0):
    """A tqdm bar that stays readable in logs: off a terminal, one line at most every 10 s
    (``enabled=False``: silent, for the ranks other than 0), starting at ``initial`` of ``total``
    (a resumed run). ``estimate``: also print, once, the estimated time of the whole run after
    its first steps (``Estimate``)."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    bar = tqdm(total=total, initial=initial, desc=desc, mininterval=0.5 if interactive else 10.0,
               dynamic_ncols=interactive, ascii=not interactive, disable=not enabled,
               file=sys.stderr if interactive else _Lines(sys.stderr))
    update = bar.update
    if estimate and enabled:
        eta = Estimate(total - initial, desc, lambda line: bar.write(line, file=sys.stdout))

        def update(n: int = 1) -> None:
            bar.update(n)
            eta(n)
    try:
        yield update
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


COMPILE_CACHE = ".cache/torchinductor"  # relative to the repository root


def share_compile_cache() -> None:
    """Point inductor's on-disk cache (compiled graphs and kernels, ``TORCHINDUCTOR_CACHE_DIR``) at
    ``COMPILE_CACHE`` under the repository root, unless the user set it: every stage process, and
    every queued experiment (whose workspace is a temporary copy), then reuses what an earlier one
    compiled, so only the first process of a configuration pays the cold compile."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(repo_root() / COMPILE_CACHE))


def one_line_warnings() -> None:
    """A fast path's fall-back (``ddpm.acceleration.FastPathWarning``) prints as one line,
    ``warning: <message>``; other warnings as Python prints them."""
    import warnings

    from ddpm.acceleration import FastPathWarning

    default = warnings.formatwarning
    if getattr(default, "one_line", False):  # set already (commands run in-process one after another)
        return

    def format(message, category, *args, **kwargs):
        if issubclass(category, FastPathWarning):
            return f"warning: {message}\n"
        return default(message, category, *args, **kwargs)

    format.one_line = True
    warnings.formatwarning = format


def experiment_name() -> str:
    """The DVC experiment a stage runs in (``DVC_EXP_NAME``, set by ``dvc exp run``), else ``workspace``."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def git_revision(cwd=None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
