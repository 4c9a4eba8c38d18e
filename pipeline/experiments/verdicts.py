"""Is a claimed ordering established by the seeds? Pure functions on plain numbers (one value
per seed and side), used by ``python -m pipeline study report``.

The difference of the two means, ``mean(left) − mean(right)``, gets a two-sided 95% interval
from Welch's t: the standard error sqrt(s²_l/n_l + s²_r/n_r) (sample variances, n − 1), the
Welch–Satterthwaite degrees of freedom, and the t quantile (``scipy.stats.t``). Welch does not
assume equal variances, which two ablations need not have, and with a handful of seeds the t
quantile is what keeps the interval honest (4.30 × the standard error at 2 + 2 degrees of
freedom, not 1.96). For two cells of the same runs (``within`` one experiment) the sides come
from the same seeds; Welch ignores that pairing, which can only widen the interval.

A claim ``left < right`` (or ``<=``) says the difference is negative, ``>`` (``>=``) that it is
positive. The verdict is:

- **holds**: the interval lies entirely on the claimed side of 0;
- **reversed**: it lies entirely on the other side;
- **not established**: it contains 0, or a side has fewer than two values (no spread to judge by).

``<=`` and ``<`` need the same evidence (seed noise never shows two means equal), except that 0
is on the side of ``<=``: an interval ending exactly at 0 (in practice: sides without spread)
satisfies ``<=`` and not ``<``.
"""

import math
import statistics
from dataclasses import dataclass

LEVEL = 0.95
HOLDS, REVERSED, NOT_ESTABLISHED = "holds", "reversed", "not established"
VERDICTS = (HOLDS, REVERSED, NOT_ESTABLISHED)
OPERATORS = {"<": -1, "<=": -1, ">": 1, ">=": 1}  # the sign the claim gives left − right
SYMBOLS = {"<": "<", "<=": "≤", ">": ">", ">=": "≥"}


@dataclass(frozen=True)
class Difference:
    """``mean(left) − mean(right)`` with its interval; ``low``/``high``/``df`` are None when a side
    has fewer than two values (``difference`` too when a side has none)."""
    difference: float | None
    low: float | None
    high: float | None
    df: float | None
    n_left: int
    n_right: int


def welch(left: list[float], right: list[float], level: float = LEVEL) -> Difference:
    """The difference of the means and its Welch t interval at ``level`` (two-sided)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n_l, n_r = len(left), len(right)
    if n_l == 0 or n_r == 0:
        return Difference(None, None, None, None, n_l, n_r)
    d = statistics.fmean(left) - statistics.fmean(right)
    if n_l < 2 or n_r < 2:
        return Difference(d, None, None, None, n_l, n_r)
    v_l, v_r = statistics.variance(left) / n_l, statistics.variance(right) / n_r
    se2 = v_l + v_r
    if se2 == 0:  # no spread on either side: the difference is what it is
        return Difference(d, d, d, math.inf, n_l, n_r)
    df = se2 ** 2 / (v_l ** 2 / (n_l - 1) + v_r ** 2 / (n_r - 1))
    from scipy.stats import t

    half = float(t.ppf((1 + level) / 2, df)) * math.sqrt(se2)
    return Difference(d, d - half, d + half, df, n_l, n_r)


def verdict(op: str, diff: Difference) -> str:
    """holds, reversed or not established for the claim ``left <op> right`` (see the module docstring)."""
    if op not in OPERATORS:
        raise ValueError(f"unknown comparison {op!r}; one of {', '.join(OPERATORS)}")
    if diff.low is None or diff.high is None:
        return NOT_ESTABLISHED
    # as if the claim were "left − right < 0": flip a claim of a positive difference
    low, high = (diff.low, diff.high) if OPERATORS[op] < 0 else (-diff.high, -diff.low)
    if high < 0 or (op in ("<=", ">=") and high <= 0):  # the claimed side; 0 is on it for <= and >=
        return HOLDS
    if low > 0:
        return REVERSED
    return NOT_ESTABLISHED
