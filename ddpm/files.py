"""Files: atomic writes, and loading a torch file with one clear error.

``atomic_write`` writes to a temporary file beside the target, syncs it and renames it over
the target, so a reader (or a crash) never sees half a file; ``atomic_folder`` does the same
for a folder of files written together. A full device (or quota) becomes one
``DiskFullError`` naming the file and the space it needs, with the temporary file removed.
``load_torch_file`` loads plain data with ``torch.load(weights_only=True)`` and turns a
missing or unreadable file into the caller's own error type, naming the file.

torch is imported by the functions that use it: the commands that only write files (the log stage,
which runs in every experiment) start without its second of import.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ddpm.errors import DiskFullError

if TYPE_CHECKING:
    import torch

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; disk quota exceeded


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a new file gets (0o666 less the umask); ``mkstemp`` alone gives 0o600."""
    return 0o666 & ~_umask()


def disk_full_cause(e: BaseException | None) -> OSError | None:
    """The "no space left" (or "quota exceeded") ``OSError`` behind ``e``: ``e`` itself or one in the
    chain of its causes (``torch.save`` reports a short write as ``RuntimeError: ... unexpected pos``
    raised while handling the ``OSError``); None when there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def format_size(n: int) -> str:
    """``512 bytes``, ``14.2 KiB``, ``3.1 MiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def disk_full(path: str | os.PathLike, needed: int | None, cause: OSError | None = None) -> DiskFullError:
    """The one-line error for ``path`` that could not be written for lack of space: the file, the
    space it needs (when known) and the space left on its device."""
    path = Path(path)
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{format_size(shutil.disk_usage(where).free)} free"
    except OSError:
        free = "free space unknown"
    what = "disk quota exceeded" if cause is not None and cause.errno == errno.EDQUOT else "no space left on device"
    need = f"it needs {format_size(needed)}" if needed is not None else "its size is unknown"
    error = DiskFullError(f"cannot write {path}: {what} ({need}, {free} in {where}); it was left as it was: "
                          "free some space, or write elsewhere, and run again")
    error.path, error.needed = path, needed
    return error


class _Counter:
    """A file that keeps nothing and counts the bytes written to it: the size a write needs."""

    def __init__(self):
        self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def _size(write: Callable[[BinaryIO], object]) -> int | None:
    """How many bytes ``write(f)`` writes, found by writing to a ``_Counter``; None if that fails."""
    counter = _Counter()
    try:
        write(counter)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - only for the message
        return None
    return counter.size


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, sync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one. A full device
    raises ``DiskFullError`` naming ``path`` and the space needed; the old file stays."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = disk_full_cause(e) if isinstance(e, (OSError, RuntimeError)) else None
        if cause is not None:
            raise disk_full(path, _size(write), cause) from e
        raise


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``shutil.copy2``; a full device raises ``DiskFullError`` naming ``dst`` and the size of ``src``
    (and removes the partial copy)."""
    try:
        shutil.copy2(src, dst)
    except OSError as e:
        cause = disk_full_cause(e)
        if cause is None:
            raise
        Path(dst).unlink(missing_ok=True)
        raise disk_full(dst, Path(src).stat().st_size, cause) from e


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``path`` to write into; when the block ends without an error,
    swap it in for ``path`` (whose old content is removed), else remove it. Readers see the old
    files of ``path`` or the new ones, never a mix; a kill between the swap's two renames leaves
    no folder at ``path`` (and the old one, which the next call puts back before it starts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pattern = glob.escape(f".{path.name}.")
    for stale in path.parent.glob(pattern + "new-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(path.parent.glob(pattern + "old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if not path.exists():  # a swap cut off between its renames: put the old folder back
            old.rename(path)
        else:
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0o700 otherwise
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except DiskFullError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        inside = getattr(e, "path", None)
        if inside is not None and tmp in inside.parents:
            raise disk_full(path / inside.relative_to(tmp), e.needed, disk_full_cause(e)) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch_file(path: str | os.PathLike, error: type[Exception], missing: str, corrupt: str,
                    parse: Callable[[Any], Any] = lambda obj: obj, map_location="cpu") -> Any:
    """``parse(torch.load(path, weights_only=True))``. Raises ``error(missing)`` when ``path`` is not a
    file, and ``error("<corrupt>: <first line of the cause>")`` when it does not load or ``parse`` fails
    (a truncated zip, a pickle of foreign objects, a missing key, …)."""
    import torch

    if not Path(path).is_file():
        raise error(missing)
    try:
        return parse(torch.load(path, map_location=map_location, weights_only=True))
    except Exception as e:
        raise error(f"{corrupt}: {first_line(e)}") from e


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes, in row-major order."""
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks of 1 MiB."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
