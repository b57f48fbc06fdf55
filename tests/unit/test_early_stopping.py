"""LoadGen's early-stopping estimate, against values computed here independently."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_tokperf import early_stopping


def binomial_cdf(k: int, n: int, q: float) -> float:
    """P(Binomial(n, q) <= k), summed term by term (exact binomial coefficients)."""
    return sum(
        math.exp(math.log(math.comb(n, x)) + x * math.log(q) + (n - x) * math.log(1 - q))
        for x in range(k + 1)
    )


def needed_by_sum(over: int, p: float, confidence: float = 0.99) -> int:
    """The least n = h + over with P(at most `over` of n over the limit) < 1 - confidence,
    when a share 1 - p of requests is over (the chance falls as n grows: bisect n)."""
    low, high = over + 1, over + 1
    while binomial_cdf(over, high, 1 - p) >= 1 - confidence:
        low, high = high + 1, 2 * high
    while low < high:
        mid = (low + high) // 2
        if binomial_cdf(over, mid, 1 - p) < 1 - confidence:
            high = mid
        else:
            low = mid + 1
    return low


def test_the_points_loadgen_users_know() -> None:
    # LoadGen's early_stopping.cc: p99 t = 0..5 and p90 t = 0..2
    expected = {0.99: [459, 662, 838, 1001, 1157, 1307], 0.90: [44, 64, 81]}
    for p, counts in expected.items():
        independent = [needed_by_sum(t, p) for t in range(len(counts))]
        assert independent == counts  # the binomial sum agrees with the published points
        assert [early_stopping.needed(t, p) for t in range(len(counts))] == counts


@given(st.integers(0, 12), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_needed_matches_the_binomial_sum(over: int, p: float) -> None:
    assert early_stopping.needed(over, p) == needed_by_sum(over, p)


@given(st.integers(1, 3000), st.integers(0, 40), st.sampled_from([0.9, 0.99, 0.999]))
def test_odds_is_the_binomial_cdf(h: int, t: int, p: float) -> None:
    assert early_stopping.odds(h, t, p) == pytest.approx(binomial_cdf(t, h + t, 1 - p), abs=1e-9)


def test_most_over_and_the_estimate() -> None:
    assert early_stopping.most_over(458, 0.99) is None
    assert early_stopping.most_over(459, 0.99) == 0
    assert early_stopping.most_over(1156, 0.99) == 3
    assert early_stopping.most_over(1157, 0.99) == 4
    # 1,157 values 1..1157: a limit at the 5th highest (1153) has 4 over: accepted;
    # just under it, 5 over: not
    values = [float(v) for v in range(1, 1158)]
    assert early_stopping.estimate(values, 0.99) == 1153.0
    assert early_stopping.estimate(values[:100], 0.99) is None
    # a large run: the estimate is the (t + 1)-th highest, t from the binomial sum
    t = early_stopping.most_over(24_576, 0.99)
    assert t is not None and needed_by_sum(t, 0.99) <= 24_576 < needed_by_sum(t + 1, 0.99)
