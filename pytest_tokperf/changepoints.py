"""Change points in one metric's history: where a series of runs shifted, and how sure.

Candidates come from binary segmentation (the `ruptures` library, least-squares cost,
at least MIN_RUNS runs a side) with a deliberately low penalty; then, like Apache
Otava's pass over E-Divisive's candidates, each must survive Student's t-test between
the runs since the previous candidate and the runs up to the next one, at `alpha` after
a Bonferroni factor for the places the split could have been. The weakest candidate
above `alpha` is dropped and the rest tested again, until every one left is
significant. A single outlier night cannot make a segment of its own (MIN_RUNS), and a
slow drift shows as a step once it adds up.
Rates on synthetic series: benchmarks/history_quality.py.

Pure functions on lists of floats; `history` feeds them and formats.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIN_RUNS = 3  # runs on each side of a change point
ALPHA = 0.001  # Otava's default max p-value


@dataclass(frozen=True)
class Segment:
    start: int  # index of its first run
    stop: int  # one past its last run
    mean: float
    low: float  # the mean's t interval
    high: float


@dataclass(frozen=True)
class Change:
    index: int  # the first run after the change
    before: Segment
    after: Segment
    p_value: float

    @property
    def ratio(self) -> float:
        return self.after.mean / self.before.mean if self.before.mean else math.inf


def _missing(extra: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"change points need {extra}: pip install 'pytest-tokperf[history]'")


def segment(values: Sequence[float], start: int, stop: int, confidence: float) -> Segment:
    """The mean of values[start:stop] with its two-sided t interval."""
    from scipy import stats

    part = values[start:stop]
    mean = statistics.fmean(part)
    half = 0.0
    if len(part) > 1:
        se = statistics.stdev(part) / math.sqrt(len(part))
        half = float(stats.t.ppf(0.5 + confidence / 2, len(part) - 1)) * se
    return Segment(start, stop, mean, mean - half, mean + half)


def _p_value(left: Sequence[float], right: Sequence[float], min_runs: int) -> float:
    """Student's t-test p-value (pooled variance: more power with 3 runs a side than
    Welch's), times the number of places the split could have been
    (Bonferroni): the split was chosen where the two sides differ most."""
    from scipy import stats

    if statistics.pstdev(left) == 0 and statistics.pstdev(right) == 0:
        return 0.0 if statistics.fmean(left) != statistics.fmean(right) else 1.0
    places = len(left) + len(right) - 2 * min_runs + 1
    return min(1.0, places * float(stats.ttest_ind(left, right, equal_var=True).pvalue))


def candidates(values: Sequence[float], min_runs: int = MIN_RUNS) -> list[int]:
    """Binary segmentation's split points with a low penalty (on purpose: too many, the
    significance test then drops the weak ones): indices of the first run after each."""
    try:
        import numpy
        import ruptures
    except ModuleNotFoundError:
        raise _missing("ruptures") from None
    n = len(values)
    if n < 2 * min_runs:
        return []
    x = numpy.asarray(values, dtype=float)
    # the noise from successive differences, robust to the steps themselves (MAD)
    diffs = numpy.diff(x)
    sigma = float(numpy.median(numpy.abs(diffs - numpy.median(diffs)))) * 1.4826 / math.sqrt(2)
    if sigma == 0:
        sigma = float(numpy.std(x)) or 1.0
    algo = ruptures.Binseg(model="l2", min_size=min_runs, jump=1).fit(x)
    return [int(b) for b in algo.predict(pen=sigma**2 * math.log(n))[:-1]]


def changes(
    values: Sequence[float],
    alpha: float = ALPHA,
    confidence: float = 0.95,
    min_runs: int = MIN_RUNS,
) -> list[Change]:
    """The significant change points of `values` (in run order), oldest first."""
    try:
        import scipy  # noqa: F401
    except ModuleNotFoundError:
        raise _missing("scipy") from None
    points = candidates(values, min_runs)
    while points:
        edges = [0, *points, len(values)]
        p = [
            _p_value(values[edges[i - 1] : edges[i]], values[edges[i] : edges[i + 1]], min_runs)
            for i in range(1, len(edges) - 1)
        ]
        worst = max(range(len(p)), key=p.__getitem__)
        if p[worst] <= alpha:
            return [
                Change(
                    edges[i],
                    segment(values, edges[i - 1], edges[i], confidence),
                    segment(values, edges[i], edges[i + 1], confidence),
                    p[i - 1],
                )
                for i in range(1, len(edges) - 1)
            ]
        del points[worst]
    return []
