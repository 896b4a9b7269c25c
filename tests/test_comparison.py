"""Seed statistics: t critical values against published tables and scipy, intervals by hand, the verdict rule."""

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel_dlm.comparison import mean_interval, paired_difference, t_quantile, verdict

# Two-sided 95% and 90% critical values of Student's t (any statistics textbook's table).
TABLE_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042}
TABLE_90 = {1: 6.314, 4: 2.132, 10: 1.812}


@pytest.mark.parametrize("df", sorted(TABLE_95))
def test_t_quantile_matches_the_published_table(df) -> None:
    assert t_quantile(0.95, df) == pytest.approx(TABLE_95[df], abs=6e-4)
    if df in TABLE_90:
        assert t_quantile(0.90, df) == pytest.approx(TABLE_90[df], abs=6e-4)


def test_t_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 8, 15, 16, 63, 200):
        for confidence in (0.5, 0.9, 0.95, 0.99):
            assert t_quantile(confidence, df) == pytest.approx(stats.t.ppf((1 + confidence) / 2, df), rel=1e-9)


def test_mean_interval_by_hand() -> None:
    values = [1.0, 2.0, 4.0, 5.0, 8.0]  # mean 4, sample sd sqrt(7.5)
    interval = mean_interval(values)
    half = 2.7764451051977934 * math.sqrt(7.5) / math.sqrt(5)
    assert (interval.mean, interval.low, interval.high, interval.n) == pytest.approx((4.0, 4 - half, 4 + half, 5))


def test_pairing_removes_what_the_seed_does_to_both_arms() -> None:
    reference = [0.9, 1.4, 0.7, 1.9, 1.1]  # seeds differ a lot
    arm = [r - 0.05 + 0.001 * i for i, r in enumerate(reference)]  # every seed slightly better
    unpaired = mean_interval(arm), mean_interval(reference)
    assert unpaired[0].high > unpaired[1].low, "the arms' own intervals overlap"
    difference = paired_difference(arm, reference)
    assert difference.high < 0 and verdict(difference, lower_is_better=True) == "better"
    assert verdict(difference, lower_is_better=False) == "worse"
    assert verdict(paired_difference(reference, reference), lower_is_better=True) == "no difference detected"
    dyadic = [0.5, 1.5, 0.75, 2.0, 1.25]  # exact in binary: every difference is exactly 0.25
    constant = paired_difference([r + 0.25 for r in dyadic], dyadic)
    assert verdict(constant, lower_is_better=False) == "better (the same on every seed: no spread to test)"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=2, max_size=12), st.floats(-10, 10))
def test_intervals_contain_their_mean_and_shift_with_the_data(values, shift) -> None:
    interval = mean_interval(values)
    assert interval.low <= interval.mean <= interval.high
    assert interval.mean == pytest.approx(statistics.fmean(values), abs=1e-9)
    moved = paired_difference([v + shift for v in values], values)
    assert moved.mean == pytest.approx(shift, abs=1e-9) and moved.high - moved.low == pytest.approx(0, abs=1e-6)


def test_bad_inputs_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="at least 2 seeds"):
        mean_interval([1.0])
    with pytest.raises(ValueError, match="diverged"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="paired seeds"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(1.5, 3)
