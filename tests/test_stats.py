"""The intervals every table prints (gta/stats.py), checked against values computed by hand."""

from __future__ import annotations

import math

import pytest

from gta.stats import estimate, format_difference, format_estimate, paired, t_quantile, verdict


@pytest.mark.parametrize(("df", "t"), [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_the_t_quantiles_of_the_printed_tables(df, t):
    """95 %, two-sided: the values of any statistics textbook's t table."""
    assert t_quantile(0.95, df) == pytest.approx(t, abs=5e-4)


def test_an_interval_computed_by_hand():
    """1..5: mean 3, sample std sqrt(2.5), half width 2.7764 * sqrt(2.5) / sqrt(5) = 1.9632."""
    e = estimate([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (e.mean, e.n) == (3.0, 5) and e.std == pytest.approx(math.sqrt(2.5))
    assert (e.low, e.high) == (pytest.approx(1.0368, abs=1e-4), pytest.approx(4.9632, abs=1e-4))
    assert format_estimate(e) == "3.00 ± 1.58 [1.04, 4.96] (n=5)"
    one = estimate([58.3])
    assert not one.has_interval and math.isnan(one.low) and format_estimate(one) == "58.30 (n=1)"


def test_three_seeds_that_all_gain_can_still_be_a_tie():
    """Differences 2, 3, 1 (every seed ahead): mean 2, std 1, half width 4.3027 / sqrt(3) = 2.4841, so
    the interval [-0.48, 4.48] contains 0."""
    d = paired({"0": 60.0, "1": 62.0, "2": 61.0}, {"0": 58.0, "1": 59.0, "2": 60.0})
    assert (d.mean, d.n) == (pytest.approx(2.0), 3)
    assert (d.low, d.high) == (pytest.approx(-0.4841, abs=1e-4), pytest.approx(4.4841, abs=1e-4))
    assert verdict(d) == "tie" and format_difference(d) == "tie +2.00 [-0.48, +4.48] (n=3)"


def test_a_paired_difference_pairs_by_seed():
    """A seed that moves both methods cancels, however far apart the seeds are; a seed only one of the
    two has is left out. Differences 3, 3.5, 2.5, 3, 3: half width 2.7764 * sqrt(0.125) / sqrt(5)."""
    base = {"0": 50.0, "1": 60.0, "2": 55.0, "3": 70.0, "4": 40.0}
    method = {"4": 43.0, "3": 73.0, "2": 57.5, "1": 63.5, "0": 53.0, "9": 99.0}
    d = paired(method, base)
    assert (d.mean, d.n) == (pytest.approx(3.0), 5) and d.low == pytest.approx(3.0 - 0.4390, abs=1e-4)
    assert verdict(d) == "gain" and format_difference(d) == "gain +3.00 [+2.56, +3.44] (n=5)"
    unpaired = estimate(list(method.values())[:5]).std  # the seeds' own spread hides the same gain
    assert unpaired > 10 * d.std
    assert verdict(paired(base, method)) == "loss"
    assert paired({"7": 1.0}, base) is None
    single = paired({"0": 51.0}, base)
    assert verdict(single) == "no interval" and format_difference(single) == "+1.00 (n=1, no interval)"
