"""What every stage command shares: its Typer app, the ``--params`` and ``--device`` options, and
``stage``, which sets the process up before the command and turns expected failures into one line.

A stage module defines ``app = stage_app()`` and one command, ``@app.command() @stage def main(...)``,
and ends with ``if __name__ == "__main__": app()``: dvc.yaml runs it as ``python -m
pipeline.stages.<name>``, and ``python -m pipeline <name>`` runs the same command. Expected
failures (``ddpm.errors.DDPMError``: bad params, missing or corrupt files; a full disk) print one
``error:`` line and exit with status 1; ``--debug`` (or ``DDPM_DEBUG=1``) lets their traceback
through instead. Any other exception is a bug and keeps its traceback.

A stop is no crash: SIGTERM (what ``kill``, ``timeout``, SLURM, Kubernetes and a preempted machine
send) raises ``Terminated``, a ``KeyboardInterrupt``, so a command stops on it as on Ctrl-C (its
``finally`` blocks and context managers run: temporary files and folders are removed, `train` marks
its MLflow run KILLED); it then prints one ``error: stopped by SIGTERM …`` line and exits with
status 143 (128 + 15; Ctrl-C: 130). Where stopping half-way would waste work, a command defers the
stop to its next safe point (``stop_at_safe_point``: `train` ends its step and writes its resume state).

Heavy imports (torch, mlflow, torch-fidelity) stay inside the commands, so that ``--help`` is quick.
"""

import functools
import inspect
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import typer

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file to read")
DEBUG_ENV = "DDPM_DEBUG"
DEBUG = typer.Option(False, "--debug", envvar=DEBUG_ENV,
                     help="show the traceback of an expected error instead of its one-line message")


def device_name(value: str) -> str:
    """The --device value, checked by the parser: auto, cpu, cuda or cuda:N (else a usage error)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


DEVICE = typer.Option("auto", "--device", parser=device_name, metavar="[auto|cpu|cuda|cuda:N]",
                      help="auto (CUDA when present), cpu, cuda or cuda:N")


def stage_app(**settings) -> typer.Typer:
    """The Typer app of a command (every stage's, and the commands around them: ``settings`` adds to it).
    Help and usage errors are click's plain text (``rich_markup_mode=None``): Typer 0.29's rich help
    prints a ``<bool>`` metavar after every flag (``--dry <bool>``, ``--help <bool>``: its rich
    formatter asks each option for its type, flags included, where the plain one skips flags), and
    plain text also reads the same in a pipe or a CI log as in a terminal (no boxes cut at 80 columns)."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, **settings)


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


def one_line_warnings() -> None:
    """A fast path's fall-back (``ddpm.errors.FastPathWarning``) prints as one line,
    ``warning: <message>``; other warnings as Python prints them."""
    import warnings

    from ddpm.errors import FastPathWarning

    default = warnings.formatwarning
    if getattr(default, "one_line", False):  # set already (commands run in-process one after another)
        return

    def format(message, category, *args, **kwargs):
        if issubclass(category, FastPathWarning):
            return f"warning: {message}\n"
        return default(message, category, *args, **kwargs)

    format.one_line = True
    warnings.formatwarning = format


def setup_process() -> None:
    """Before a stage's work: the allocator keeps freed memory, compiled kernels are cached for every
    stage process (``pipeline.workspace.share_compile_cache``), a fast path that falls back says so in
    one line."""
    from pipeline.workspace import share_compile_cache

    keep_freed_memory()
    share_compile_cache()
    one_line_warnings()


FORCED = {"debug": False}  # set by ``python -m pipeline --debug`` for the command it runs


def debugging() -> bool:
    return FORCED["debug"] or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- SIGTERM: a stop, as Ctrl-C
SIGINT_STATUS, SIGTERM_STATUS = 130, 143  # 128 + the signal's number, as a shell reports a process it killed
STOP_GRACE = 20.0  # seconds a deferred SIGTERM waits for a safe point before it stops the work where it is
# a SIGTERM this soon after the first is the same stop, not a second one: `scancel` and a preemption signal every
# process of a SLURM job, and its batch script passes the signal on to the run, so train gets it twice at once
SAME_STOP_SECONDS = 1.0


class Terminated(KeyboardInterrupt):
    """A SIGTERM: the command stops as on Ctrl-C (this is a ``KeyboardInterrupt``, so whatever handles
    Ctrl-C handles it too), then exits with status 143. Its message says what was kept."""


def _terminate(signum, frame):
    raise Terminated()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_stops():
    """Within the block a SIGTERM raises ``Terminated`` in the main thread (outside the main thread,
    where no signal handler can be set, nothing changes); the previous handler is restored after."""
    if not _in_main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class StopRequest:
    """What ``stop_at_safe_point`` yields: calling it says whether a SIGTERM asked to stop (the work
    then stops at this safe point, and the grace timer is disarmed so that what it saves is saved)."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        if self.requested and _in_main_thread():
            signal.setitimer(signal.ITIMER_REAL, 0)
        return self.requested


@contextmanager
def stop_at_safe_point(grace: float | None = None):
    """Within the block the first SIGTERM only sets the ``StopRequest`` it yields; the work asks it at its
    safe points and stops there itself (raising ``Terminated`` once it has saved what it can). A second
    SIGTERM (``SAME_STOP_SECONDS`` or more after the first: one sooner is the same stop, delivered twice),
    or ``grace`` seconds without reaching a safe point, raise ``Terminated`` at once, as outside the block.
    Outside the main thread the request is never set (and SIGTERM is left as it was)."""
    request, grace = StopRequest(), STOP_GRACE if grace is None else grace
    if not _in_main_thread():
        yield request
        return
    first: list[float] = []

    def on_sigterm(signum, frame):
        if request.requested:
            if time.monotonic() - first[0] < SAME_STOP_SECONDS:
                return
            raise Terminated()
        request.requested = True
        first.append(time.monotonic())
        signal.setitimer(signal.ITIMER_REAL, grace)

    def on_alarm(signum, frame):
        raise Terminated(f"(no safe point within {grace:g} s)")

    old_term, old_alarm = signal.signal(signal.SIGTERM, on_sigterm), signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield request
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)


def stopped(e: KeyboardInterrupt) -> tuple[str, int]:
    """The line and the exit status of a command stopped by SIGTERM (``Terminated``) or Ctrl-C."""
    what, status = ("SIGTERM", SIGTERM_STATUS) if isinstance(e, Terminated) else ("Ctrl-C", SIGINT_STATUS)
    return f"stopped by {what}" + (f" {e}" if str(e) else ""), status


def one_line(fn, debug: bool = False):
    """Run ``fn``, turning the project's own errors and a missing file into one ``error:`` line and exit
    status 1 (unless ``debug`` or ``debugging()``); any other exception keeps its traceback. A SIGTERM
    stops ``fn`` as Ctrl-C does (``Terminated``); either is one line, exit status 143 or 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sigterm_stops():
            return run(*args, **kwargs)

    def run(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except KeyboardInterrupt as e:
            if debug or debugging():
                raise
            line, status = stopped(e)
            if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 says it (and where its files are)
                typer.echo(f"error: {line}", err=True)
            sys.exit(status)

    def checked(*args, **kwargs):
        if debug or debugging():
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


def stage(fn):
    """A stage command: ``--debug`` added to its options, the process set up (``setup_process``),
    expected errors as one line (``one_line``)."""
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        setup_process()
        return one_line(fn, debug)(*args, **kwargs)

    signature = inspect.signature(fn)
    wrapper.__signature__ = signature.replace(parameters=[
        *signature.parameters.values(),
        inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=DEBUG, annotation=bool)])
    return wrapper
