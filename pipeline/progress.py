"""Progress that stays readable in logs: a tqdm bar, and one estimate of the whole run's time."""

import sys
import time
from contextlib import contextmanager


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
