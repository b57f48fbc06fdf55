"""Is a run steady? Whether its rate or its latencies changed while it was measured.

Pure functions over records, no I/O. A verdict on a run whose engine slowed down part
way (a GPU that heats up and throttles, a cache that fills, a neighbour that starts)
is a verdict on whichever part happened to be measured; these tests find the change
so the verdict can say so (INVALID) or be taken on the steady tail.

- Rate: a single change point in the run's window rates (the batches the floor's
  interval uses, unmerged; an Offline run's windows up to the last request's first
  token, before its queue drains; five completions a window on average). At every
  split leaving three windows a side, Student's t (pooled variance) of the two sides'
  mean rates; the largest |t| is significant when it exceeds the t quantile at
  1 - ALPHA / (2 x splits) (Bonferroni), and the change counts only when the rate
  moved by more than TOLERANCE as well.
- Latency: the requests' latency (TTFT, TPOT, ITL or E2E) in the first third of the
  run against the last third (by issue time): a Mann-Whitney U test (normal
  approximation) at ALPHA, and the medians apart by more than LATENCY_TOLERANCE.

The false-alarm rates on steady simulated engines are measured in
`benchmarks/verdict_quality.py`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.metrics import (
    BATCHES,
    MIN_BATCHES,
    MIN_WINDOW_REQUESTS,
    NS,
    Batches,
    batch_rates,
    independent,
    rates_between,
    t_quantile,
)

ALPHA = 0.01
TOLERANCE = 0.10  # a rate change smaller than this is not worth a word
LATENCY_TOLERANCE = 0.25


@dataclass(frozen=True)
class Change:
    """The run's rate (or a latency) moved from `before` to `after` at `at_ns`."""

    at_ns: int  # perf_counter_ns of the change (the split between windows)
    at_s: float  # seconds after the run's first issue
    before: float
    after: float
    t: float  # the test statistic (Welch's t, or the Mann-Whitney z)
    width_ns: int = 0  # a rate change: its windows' width ...
    end_ns: int | None = None  # ... and where the steady part of the run ends
    batch_ns: int = 0  # the narrowest window a floor's interval may use (`batch_rates`)
    start_ns: int = 0  # where the windows begin (after the ramp)

    @property
    def fell(self) -> bool:
        return self.after < self.before


def windows(
    records: Sequence[RequestRecord], end_ns: int | None, scenario: str
) -> tuple[list[float], int, int, int]:
    """(window rates, start ns, window width ns, batch width ns) the rate test looks at;
    the batch width is the narrowest window a floor's interval may use.

    A run over time: at most `BATCHES` equal windows after the ramp, each as wide as
    `metrics.batch_rates` asks at least (two mean latencies, five completions), never
    merged: a step in the rate is what merging would hide. Offline: up to `BATCHES`
    windows, five completions each on average, from the first token to the last
    request's first token, after which the queue only drains (a batching engine slows
    down there whatever its state).
    """
    if scenario != "offline":
        b = batch_rates(records, end_ns, merge=False)
        if not b.rates:
            return [], 0, 0, 0
        span = b.width_ns * len(b.rates)
        k = min(BATCHES, len(b.rates))
        rates = rates_between(records, b.start_ns, b.start_ns + span, k)
        return rates, b.start_ns, span // k, b.width_ns
    firsts = [r.chunk_ns[0] for r in records if r.ok and r.chunk_ns]
    if len(firsts) < 2:
        return [], 0, 0, 0
    start, end = min(firsts), steady_end(records, end_ns, scenario) or 0
    # as over time, a window holds five completions on average: fewer windows, or none
    done = sum(1 for r in records if r.ok and start <= r.end_ns <= end)
    k = min(BATCHES, done // MIN_WINDOW_REQUESTS)
    if k < MIN_BATCHES or end - start < k:
        return [], start, 0, 0
    width = (end - start) // k
    return rates_between(records, start, end, k), start, width, width


def steady_end(records: Sequence[RequestRecord], end_ns: int | None, scenario: str) -> int | None:
    """Where the measured steady part of a run ends: `end_ns` (None: its last end), or
    for an Offline run its last request's first token, after which its queue drains."""
    firsts = [r.chunk_ns[0] for r in records if r.ok and r.chunk_ns]
    if scenario != "offline" or not firsts:
        return end_ns
    return max(firsts)


def _pooled_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Student's t of mean(b) - mean(a) with the pooled variance: under the hypothesis
    tested, a steady run, both sides are the same series, so one variance (and
    len(a) + len(b) - 2 degrees of freedom); Welch's, with a side of three windows of
    which one straddles the change, had about two and could not see a halving."""
    na, nb = len(a), len(b)
    pooled = ((na - 1) * statistics.variance(a) + (nb - 1) * statistics.variance(b)) / (na + nb - 2)
    diff = statistics.fmean(b) - statistics.fmean(a)
    if pooled == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(pooled * (1 / na + 1 / nb))


def change_point(
    rates: Sequence[float], alpha: float = ALPHA, tolerance: float = TOLERANCE
) -> tuple[int, float, float, float] | None:
    """(split index, mean before, mean after, t) of the one significant change in
    `rates`, or None: too few windows (fewer than `MIN_BATCHES`), no significant
    split, or a change within `tolerance`."""
    k = len(rates)
    if k < MIN_BATCHES:
        return None
    splits = range(3, k - 2)  # three windows a side: two made it fire 2% on noise
    best = None
    for s in splits:
        t = _pooled_t(rates[:s], rates[s:])
        if best is None or abs(t) > abs(best[3]):
            best = (s, statistics.fmean(rates[:s]), statistics.fmean(rates[s:]), t)
    assert best is not None
    s, before, after, t = best
    critical = t_quantile(1 - alpha / (2 * len(splits)), k - 2)
    moved = abs(after / before - 1) if before > 0 else math.inf
    if abs(t) <= critical or moved <= tolerance:
        return None
    return s, before, after, t


def rate_change(
    records: Sequence[RequestRecord], end_ns: int | None, scenario: str
) -> Change | None:
    """Where the run's output rate changed for good, if it did (see the module doc)."""
    rates, start, width, batch = windows(records, end_ns, scenario)
    found = change_point(rates)
    if found is None or not records:
        return None
    s, before, after, t = found
    at = start + s * width
    first = min(r.issue_ns for r in records)
    end = steady_end(records, end_ns, scenario)
    return Change(at, (at - first) / NS, before, after, t, width, end, batch, start)


def tail_batches(records: Sequence[RequestRecord], change: Change) -> Batches:
    """The batches of the tail after the change, for the floors' interval: windows as
    narrow as the run's own batches may be, merged like them (`metrics.independent`)."""
    end = max(r.end_ns for r in records) if change.end_ns is None else change.end_ns
    if end <= change.at_ns:
        return Batches(())
    k = max(1, int((end - change.at_ns) // change.batch_ns)) if change.batch_ns > 0 else BATCHES
    return independent(records, change.at_ns, end, k)


def head_batches(records: Sequence[RequestRecord], change: Change) -> Batches:
    """The batches before the change (from the end of the ramp), cut like `tail_batches`."""
    if change.batch_ns <= 0 or change.at_ns <= change.start_ns:
        return Batches(())
    k = int((change.at_ns - change.start_ns) // change.batch_ns)
    return independent(records, change.start_ns, change.at_ns, k)


def latency_change(
    records: Sequence[RequestRecord],
    value: Callable[[RequestRecord], float | None],
    alpha: float = ALPHA,
    tolerance: float = LATENCY_TOLERANCE,
) -> Change | None:
    """Whether a per-request latency moved between the run's first and last thirds
    (requests by issue time): Mann-Whitney U and medians apart by `tolerance`."""
    ok = sorted((r for r in records if r.ok), key=lambda r: r.issue_ns)
    third = len(ok) // 3
    if third < 8:  # too few for the normal approximation to mean anything
        return None
    first = [v for r in ok[:third] if (v := value(r)) is not None]
    last = [v for r in ok[-third:] if (v := value(r)) is not None]
    if len(first) < 8 or len(last) < 8:
        return None
    n1, n2 = len(first), len(last)
    ranked = sorted([(v, 0) for v in first] + [(v, 1) for v in last])
    ranks: list[float] = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for m in range(i, j + 1):
            ranks[m] = (i + j) / 2 + 1
        i = j + 1
    r2 = sum(rank for rank, (_, side) in zip(ranks, ranked, strict=True) if side == 1)
    u = r2 - n2 * (n2 + 1) / 2
    z = (u - n1 * n2 / 2) / math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    before, after = statistics.median(first), statistics.median(last)
    moved = abs(after / before - 1) if before > 0 else math.inf
    if abs(z) <= NormalDist().inv_cdf(1 - alpha / 2) or moved <= tolerance:
        return None
    at = ok[-third].issue_ns
    return Change(at, (at - ok[0].issue_ns) / NS, before, after, z)
