"""Progress that stays readable in logs: a tqdm bar, and an estimate of the whole run's time that is
measured again as the run goes."""

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
    """Says how long all ``total`` units will take: once after the first units of work, and again
    whenever the rate of the latest stretch moves that estimate by more than ``drift`` (a machine that
    got busier, or freer, since the start: a rate measured once can be off by twice).

    The clock starts after the first update (the first step carries one-time costs: first
    allocations, torch.compile) and the first rate is measured from there until ``min_seconds``
    have passed and ``min_units`` more were done. From then on, every ``every`` of the total (and
    at least ``min_seconds``), the rate of the units since the last check projects the total
    again; a projection more than ``drift`` (relative) away from the last one said is said."""

    def __init__(self, total: int, desc: str, write, min_seconds: float = 5.0, min_units: int = 3, clock=time.perf_counter,
                 every: float = 0.1, drift: float = 0.1):
        self.total, self.desc, self.write, self.clock = total, desc, write, clock
        self.min_seconds, self.min_units, self.every, self.drift = min_seconds, min_units, every, drift
        self.begin = clock()
        self.start = self.first = None
        self.done = 0
        self.said: float | None = None  # the total said last, seconds
        self.mark: tuple[float, int] | None = None  # (time, units done) of the last check

    def __call__(self, n: int) -> None:
        self.done += n
        if self.first is None:
            self.start, self.first = self.clock(), self.done
            return
        if self.done >= self.total:
            return
        now = self.clock()
        if self.said is None:
            units, seconds = self.done - self.first, now - self.start
            if units >= self.min_units and seconds >= self.min_seconds:
                left = (self.total - self.done) * seconds / units
                self.write(f"{self.desc}: {units / seconds:.3g} steps/s; estimated total "
                           f"{format_seconds(now - self.begin + left)} for {self.total} steps, {format_seconds(left)} to go")
                self.said, self.mark = now - self.begin + left, (now, self.done)
            return
        units, seconds = self.done - self.mark[1], now - self.mark[0]
        if units < max(self.min_units, self.every * self.total) or seconds < self.min_seconds:
            return
        left = (self.total - self.done) * seconds / units
        projected = now - self.begin + left
        self.mark = (now, self.done)
        if abs(projected - self.said) > self.drift * self.said:
            self.write(f"{self.desc}: now {units / seconds:.3g} steps/s; estimated total {format_seconds(projected)} "
                       f"for {self.total} steps (said {format_seconds(self.said)}), {format_seconds(left)} to go")
            self.said = projected


@contextmanager
def progress(total: int, desc: str, enabled: bool = True, estimate: bool = False, initial: int = 0):
    """A tqdm bar that stays readable in logs: off a terminal, one line at most every 10 s
    (``enabled=False``: silent, for the ranks other than 0), starting at ``initial`` of ``total``
    (a resumed run). ``estimate``: also print the estimated time of the whole run after its
    first steps, and again when the rate changes it (``Estimate``)."""
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
