"""MLPerf LoadGen's early-stopping estimate for a latency percentile, ported.

Source: mlcommons/inference `loadgen/early_stopping.cc` (`odds`, `find_min_passing`)
and `loadgen/results.cc` (`PerformanceSummary::EarlyStopping`, Server case): with `t`
requests over the latency limit, a run shows the p-th percentile under the limit at
confidence `c` only if it has at least `h + t` requests, `h` the least count with
P(Binomial(h + t, 1 - p) <= t) < 1 - c. LoadGen uses tolerance 0 and confidence 0.99.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

CONFIDENCE = 0.99  # LoadGen's `EarlyStopping`: confidence 0.99, tolerance 0
_TOLERANCE = 1.0 / (1 << 33)  # LoadGen's kTolerance for the hypergeometric series


def _lbeta(x: int, y: int) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def _hypergeometric_2f1_a1(b: int, c: int, x: float) -> float:
    """2F1(1, b; c; x) by its series (DLMF 15.2.1); b = -t <= 0 makes it terminate."""
    term = result = 1.0
    i = 0
    while abs(term) > _TOLERANCE:
        term *= (b + i) * x / (c + i)
        result += term
        i += 1
    return result


def _beta_regularized(x: float, a: int, b: int) -> float:
    """I_x(a, b) = x^a (1-x)^(b-1) / a * 2F1(1, 1-b; 1+a; x/(x-1)) / B(a, b) (DLMF 15.8.1)."""
    log = a * math.log(x) + (b - 1) * math.log(1 - x) - _lbeta(a, b)
    return math.exp(log) / a * _hypergeometric_2f1_a1(1 - b, 1 + a, x / (x - 1))


def odds(h: int, t: int, p: float) -> float:
    """Chance of `t` or fewer requests over the limit in `h + t`, when a share `1 - p` is."""
    return _beta_regularized(p, h, 1 + t)


@lru_cache(maxsize=4096)
def min_passing(t: int, p: float, confidence: float = CONFIDENCE) -> int:
    """The least `h` with odds(h, t, p) < 1 - confidence (LoadGen's `find_min_passing`)."""
    if not 0 < p < 1 or not 0 < confidence < 1 or t < 0:
        raise ValueError(f"min_passing(t={t}, p={p}, confidence={confidence}): out of range")
    low = max(1, math.ceil(math.log(1 - confidence) / math.log(p)))  # the t = 0 answer
    high = low
    while odds(high, t, p) >= 1 - confidence:  # h grows with t: search upwards
        low, high = high + 1, 2 * high
    while low < high:
        mid = (low + high) // 2
        if odds(mid, t, p) < 1 - confidence:
            high = mid
        else:
            low = mid + 1
    return low


def needed(over: int, p: float, confidence: float = CONFIDENCE) -> int:
    """Fewest requests with which `over` of them over the limit still accept the p-th
    percentile: h + t. For p99: 459, 662, 838, 1,001, 1,157, 1,307 for t = 0..5."""
    return min_passing(over, p, confidence) + over


def most_over(n: int, p: float, confidence: float = CONFIDENCE) -> int | None:
    """The most requests of `n` that may be over a limit with the run still accepted
    (None: `n` is too few even with none over)."""
    if n < needed(0, p, confidence):
        return None
    # needed(t) grows with t, and exceeds n once t passes n * (1 - p) (the expected
    # count): search below that, where LoadGen's series is also well conditioned
    low, high = 0, min(n, math.ceil(n * (1 - p)) + 1)
    while low < high:
        mid = (low + high + 1) // 2
        if needed(mid, p, confidence) <= n:
            low = mid
        else:
            high = mid - 1
    return low


def estimate(values: Sequence[float], p: float, confidence: float = CONFIDENCE) -> float | None:
    """The lowest limit these values would be accepted against: the (t + 1)-th highest,
    t = `most_over(n)`. A limit at or above it has at most t values over it, which is
    exactly when LoadGen's Server rule accepts the run (None: too few values)."""
    t = most_over(len(values), p, confidence)
    if t is None:
        return None
    return sorted(values, reverse=True)[t]
