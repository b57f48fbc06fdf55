"""Regression verdicts: this run against its baseline, judged on a confidence interval.

Pure functions, no I/O. Two intervals of the ratio current / baseline:

- Throughput: a **paired log-ratio t interval over aligned batch-means windows**
  (`metrics.window_rates`): window j of each run covers the same fraction of its run
  (the same stretch of the same workload), so the structure both runs share (ramp-up,
  the prompt mix, the drain) cancels in d_j = log(current_j / baseline_j); the
  interval is ratio x exp(+/- t(k-1) sd(d) / sqrt(k)) around the ratio of the two
  tokens/s (the delta method: log of the ratio of means ~ mean of d). Windows are the
  batches the floor verdicts already use, so one noise model serves both. Offline runs
  (the same requests each time) pair **windows of equal work** instead
  (`metrics.token_windows`: window j holds the j-th tenth of each run's output tokens),
  so a window boundary never cuts a prefill or a burst differently in the two runs; on
  the embedded engine that halves the interval of an unchanged rerun. When the
  runs' windows cannot be paired (different counts, an empty window) it falls back to
  an unpaired **log-ratio t interval with Welch's degrees of freedom**.
- Latency percentiles: **distribution-free order-statistic intervals** (binomial) of each
  run's percentile, each at 1 - (1 - confidence) / 2, combined into
  [low_cur / high_base, high_cur / low_base] (Bonferroni: covers at least `confidence`).

A throughput ratio regresses when it falls below 1 - tolerance, a latency ratio when it
rises above 1 + tolerance. FAIL when the whole interval is beyond the tolerance, PASS
when the whole interval is within it, INCONCLUSIVE when it straddles it. An interval
wholly on the better side of 1 +/- tolerance is IMPROVED (a pass, and a baseline worth
updating).

Both intervals cover the noise *within* the two runs; a machine whose speed drifts
between runs needs that drift in the tolerance (`calibrate` measures it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from pytest_tokperf.metrics import PERCENTILES, percentile, t_quantile

THROUGHPUT = "tokens_per_s"
LATENCIES = ("ttft", "tpot", "e2e")  # the per-request latencies a baseline keeps
# no_regression keywords: tokens_per_s, and <latency>_<percentile> such as ttft_p99
KEYWORDS: tuple[str, ...] = (THROUGHPUT, *(f"{m}_{p}" for m in LATENCIES for p in PERCENTILES))
DEFAULT_TOLERANCE = 0.05
THROUGHPUT_METHOD = "paired log-ratio t interval over aligned batch-means windows"
TOKEN_METHOD = "paired log-ratio t interval over batch-means windows of equal work"
UNPAIRED_METHOD = "log-ratio t interval, Welch df, over batch-means windows"
LATENCY_METHOD = "order-statistic (binomial) percentile intervals, Bonferroni-combined"


@dataclass(frozen=True)
class Ratio:
    """current / baseline with a confidence interval (None bounds: no interval)."""

    estimate: float
    low: float | None
    high: float | None
    confidence: float


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    k = len(values)
    mean = sum(values) / k
    return mean, sum((v - mean) ** 2 for v in values) / (k - 1)


def throughput_ratio(
    current: Sequence[float],
    baseline: Sequence[float],
    confidence: float,
    estimate: float | None = None,
) -> Ratio | None:
    """Interval of mean(current) / mean(baseline) from two runs' window rates: paired
    when the windows align, else unpaired (Welch). `estimate`, when given, is the ratio
    the paired interval is centred on (windows of equal work: the runs' rates)."""
    if len(current) != len(baseline) or min([*current, *baseline], default=0) <= 0:
        return welch_ratio(current, baseline, confidence)
    k = len(current)
    if k < 2:
        return None
    ratio = sum(current) / sum(baseline) if estimate is None else estimate
    d = [math.log(c / b) for c, b in zip(current, baseline, strict=True)]
    _, var = _mean_var(d)
    half = t_quantile((1 + confidence) / 2, k - 1) * math.sqrt(var / k)
    return Ratio(ratio, ratio * math.exp(-half), ratio * math.exp(half), confidence)


def welch_ratio(
    current: Sequence[float], baseline: Sequence[float], confidence: float
) -> Ratio | None:
    """Unpaired interval of mean(current) / mean(baseline): log-ratio t, Welch df."""
    if len(current) < 2 or len(baseline) < 2:
        return None
    m1, s1 = _mean_var(current)
    m2, s2 = _mean_var(baseline)
    if m1 <= 0 or m2 <= 0:
        return None
    v1 = s1 / (len(current) * m1**2)  # delta method: var(log mean) = var(mean) / mean^2
    v2 = s2 / (len(baseline) * m2**2)
    se = math.sqrt(v1 + v2)
    ratio = m1 / m2
    if se == 0:
        return Ratio(ratio, ratio, ratio, confidence)
    df = (v1 + v2) ** 2 / (v1**2 / (len(current) - 1) + v2**2 / (len(baseline) - 1))
    half = t_quantile((1 + confidence) / 2, max(1, math.floor(df))) * se
    return Ratio(ratio, ratio * math.exp(-half), ratio * math.exp(half), confidence)


def percentile_interval(
    values: Sequence[float], p: float, confidence: float
) -> tuple[float, float] | None:
    """Distribution-free interval of the p-th percentile: order statistics whose ranks
    bound a Binomial(n, p) count (normal approximation). None when the sample is too
    small for the upper (or lower) rank to exist: a p99 of 50 requests has no interval."""
    n = len(values)
    if n == 0:
        return None
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    half = z * math.sqrt(n * p * (1 - p))
    low, high = math.floor(n * p - half), math.ceil(n * p + half)
    if low < 0 or high > n - 1:
        return None
    ordered = sorted(values)
    return ordered[low], ordered[high]


def latency_ratio(
    current: Sequence[float], baseline: Sequence[float], p: float, confidence: float
) -> Ratio | None:
    """Interval of percentile(current, p) / percentile(baseline, p); the point estimate
    uses LoadGen's percentile rule, like the reported numbers. None: no samples."""
    if not current or not baseline:
        return None
    base = percentile(baseline, p)
    if base <= 0:
        return None
    estimate = percentile(current, p) / base
    each = 1 - (1 - confidence) / 2
    cur_iv = percentile_interval(current, p, each)
    base_iv = percentile_interval(baseline, p, each)
    if cur_iv is None or base_iv is None or base_iv[0] <= 0:
        return Ratio(estimate, None, None, confidence)
    return Ratio(estimate, cur_iv[0] / base_iv[1], cur_iv[1] / base_iv[0], confidence)


def status(ratio: Ratio | None, tolerance: float, higher_is_better: bool) -> str:
    """PASS, FAIL, INCONCLUSIVE or IMPROVED for one metric's ratio interval."""
    if ratio is None or ratio.low is None or ratio.high is None:
        return "INCONCLUSIVE"
    low, high = ratio.low, ratio.high
    if higher_is_better:  # throughput: a drop below 1 - tolerance regresses
        worse, better, within = high < 1 - tolerance, low > 1 + tolerance, low >= 1 - tolerance
    else:  # latency: a rise above 1 + tolerance regresses
        worse, better, within = low > 1 + tolerance, high < 1 - tolerance, high <= 1 + tolerance
    if worse:
        return "FAIL"
    if better:
        return "IMPROVED"
    return "PASS" if within else "INCONCLUSIVE"


def higher_is_better(metric: str) -> bool:
    return metric == THROUGHPUT


@dataclass(frozen=True)
class Check:
    """One metric of one test against its baseline."""

    metric: str  # a KEYWORDS entry
    observed: float  # tokens/s, or seconds for latencies
    baseline: float
    ratio: float
    low: float | None  # ratio interval
    high: float | None
    tolerance: float
    status: str  # PASS / FAIL / INCONCLUSIVE / IMPROVED, then maybe ACKNOWLEDGED
    method: str
    note: str = ""  # acknowledgement or why no interval


def compare(
    current: Mapping[str, object],
    baseline: Mapping[str, object],
    tolerances: Mapping[str, float],
    confidence: float,
) -> list[Check]:
    """One check per metric in `tolerances`, from two payloads' `windows_per_s` and
    `latencies_ms` (what `baseline.extras` adds)."""
    checks = []
    for metric, tolerance in tolerances.items():
        if metric == THROUGHPUT:
            cur_w, base_w, method = _windows(current, baseline)
            observed = float(current.get(THROUGHPUT) or 0.0)  # type: ignore[arg-type]
            base = float(baseline.get(THROUGHPUT) or 0.0)  # type: ignore[arg-type]
            # windows of equal work do not average to the rate: the runs' rates give it
            given = observed / base if method == TOKEN_METHOD and base > 0 else None
            ratio = throughput_ratio(cur_w, base_w, confidence, given)
        else:
            what, pct = metric.split("_")
            cur_l = _floats(_get(current.get("latencies_ms"), what))
            base_l = _floats(_get(baseline.get("latencies_ms"), what))
            ratio = latency_ratio(cur_l, base_l, PERCENTILES[pct], confidence)
            observed = percentile(cur_l, PERCENTILES[pct]) / 1000 if cur_l else math.nan
            base = percentile(base_l, PERCENTILES[pct]) / 1000 if base_l else math.nan
            method = LATENCY_METHOD
        if ratio is None:
            checks.append(
                Check(
                    metric,
                    observed,
                    base,
                    math.nan,
                    None,
                    None,
                    tolerance,
                    "INCONCLUSIVE",
                    method,
                    "no data to compare",
                )
            )
            continue
        note = "" if ratio.low is not None else "too few requests for an interval"
        checks.append(
            Check(
                metric,
                observed,
                base,
                ratio.estimate,
                ratio.low,
                ratio.high,
                tolerance,
                status(ratio, tolerance, higher_is_better(metric)),
                method,
                note,
            )
        )
    return checks


def _windows(
    current: Mapping[str, object], baseline: Mapping[str, object]
) -> tuple[list[float], list[float], str]:
    """The two runs' windows to pair, and the interval's name: windows of equal work
    when both have them (Offline), else of equal time."""
    cur_t = _floats(current.get("token_windows_per_s"))
    base_t = _floats(baseline.get("token_windows_per_s"))
    if cur_t and len(cur_t) == len(base_t):
        return cur_t, base_t, TOKEN_METHOD
    cur_w = _floats(current.get("windows_per_s"))
    base_w = _floats(baseline.get("windows_per_s"))
    paired = len(cur_w) == len(base_w) and min([*cur_w, *base_w], default=0) > 0
    return cur_w, base_w, THROUGHPUT_METHOD if paired else UNPAIRED_METHOD


def _get(table: object, key: str) -> object:
    return table.get(key) if isinstance(table, dict) else None


def _floats(values: object) -> list[float]:
    if not isinstance(values, list):
        return []
    return [float(v) for v in values]


# overall regression status, worst first
ORDER = ("FAIL", "INCONCLUSIVE", "ACKNOWLEDGED", "IMPROVED", "PASS")


def overall(statuses: Sequence[str]) -> str:
    """The worst status of a test's checks (PASS when there are none)."""
    for name in ORDER:
        if name in statuses:
            return name
    return "PASS"
