"""Files: atomic writes, and loading a torch file with one clear error.

``atomic_write`` writes to a temporary file beside the target, syncs it and renames it over
the target, so a reader (or a crash) never sees half a file. ``load_torch_file`` loads plain
data with ``torch.load(weights_only=True)`` and turns a missing or unreadable file into the
caller's own error type, naming the file.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def file_mode() -> int:
    """The mode a new file gets (0o666 less the umask); ``mkstemp`` alone gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, sync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch_file(path: str | os.PathLike, error: type[Exception], missing: str, corrupt: str,
                    parse: Callable[[Any], Any] = lambda obj: obj, map_location="cpu") -> Any:
    """``parse(torch.load(path, weights_only=True))``. Raises ``error(missing)`` when ``path`` is not a
    file, and ``error("<corrupt>: <first line of the cause>")`` when it does not load or ``parse`` fails
    (a truncated zip, a pickle of foreign objects, a missing key, …)."""
    if not Path(path).is_file():
        raise error(missing)
    try:
        return parse(torch.load(path, map_location=map_location, weights_only=True))
    except Exception as e:
        raise error(f"{corrupt}: {first_line(e)}") from e
