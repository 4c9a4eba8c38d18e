"""The interval and verdict of a study's claims (pipeline/verdicts.py) against scipy's own Welch
t-test on fixed numbers: the interval is scipy's ``ttest_ind(equal_var=False).confidence_interval``,
and each verdict is the one its interval implies."""

import math
import statistics

import pytest
from scipy import stats

from pipeline.experiments.verdicts import HOLDS, NOT_ESTABLISHED, REVERSED, Difference, verdict, welch

# (left, right, claim, verdict): FID-like numbers per seed
CASES = [
    # DDPM beats a much worse ablation: the interval lies below 0
    ([20.05, 21.13, 19.02], [37.22, 33.31, 41.10], "<", HOLDS),
    # the claim says DDIM < DDPM, the seeds say the opposite beyond their spread
    ([43.13, 42.10, 44.16], [32.11, 30.32, 33.90], "<", REVERSED),
    # overlapping seeds: the interval contains 0
    ([35.59, 31.88, 28.17], [32.05, 33.12, 30.46], "<=", NOT_ESTABLISHED),
    # unequal numbers of seeds and spreads; a claim of a positive difference
    ([3.538, 3.529, 3.547, 3.541], [3.388, 3.377], ">", HOLDS),
    ([3.538, 3.529, 3.547, 3.541], [3.388, 3.377], "<=", REVERSED),
]


@pytest.mark.parametrize("left, right, op, expected", CASES)
def test_interval_is_scipys_welch_interval_and_verdict_follows(left, right, op, expected):
    d = welch(left, right)
    ref = stats.ttest_ind(left, right, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert d.difference == pytest.approx(statistics.fmean(left) - statistics.fmean(right), rel=1e-12)
    assert (d.low, d.high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert d.df == pytest.approx(ref.df, rel=1e-9)
    assert (d.n_left, d.n_right) == (len(left), len(right))
    assert verdict(op, d) == expected


def test_not_established_where_a_normal_interval_would_call_it():
    """Two seeds a side: 1.96 standard errors exclude 0, the t quantile at ~2 degrees of freedom does
    not, and scipy's p-value agrees (> 0.05)."""
    left, right = [30.0, 31.5], [33.2, 34.0]
    d = welch(left, right)
    se = math.sqrt(statistics.variance(left) / 2 + statistics.variance(right) / 2)
    assert d.difference + 1.96 * se < 0  # the normal approximation would say "holds"
    assert stats.ttest_ind(left, right, equal_var=False).pvalue > 0.05
    assert d.low < 0 < d.high and verdict("<", d) == NOT_ESTABLISHED


def test_the_claimed_side_decides_holds_or_reversed():
    below = Difference(-2.0, -3.0, -1.0, 4.0, 3, 3)
    assert [verdict(op, below) for op in ("<", "<=", ">", ">=")] == [HOLDS, HOLDS, REVERSED, REVERSED]
    across = Difference(0.5, -1.0, 2.0, 4.0, 3, 3)
    assert {verdict(op, across) for op in ("<", "<=", ">", ">=")} == {NOT_ESTABLISHED}


def test_fewer_than_two_values_a_side_is_not_established():
    d = welch([3.277], [3.538, 3.529, 3.547])
    assert d.difference == pytest.approx(3.277 - statistics.fmean([3.538, 3.529, 3.547]))
    assert d.low is None and d.high is None and verdict("<", d) == NOT_ESTABLISHED
    assert welch([], [1.0, 2.0]).difference is None and verdict(">", welch([], [1.0, 2.0])) == NOT_ESTABLISHED


def test_sides_without_spread_give_a_point_interval():
    """scipy returns NaN here; the difference is then exactly known."""
    d = welch([2.0, 2.0], [3.0, 3.0])
    assert (d.low, d.high) == (-1.0, -1.0) and verdict("<", d) == HOLDS and verdict(">", d) == REVERSED
    tie = welch([2.0, 2.0], [2.0, 2.0, 2.0])
    assert verdict("<=", tie) == HOLDS and verdict("<", tie) == NOT_ESTABLISHED and verdict(">=", tie) == HOLDS


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown comparison"):
        verdict("=<", Difference(0.0, -1.0, 1.0, 2.0, 2, 2))
    with pytest.raises(ValueError, match="level"):
        welch([1.0, 2.0], [1.0, 2.0], level=95)
