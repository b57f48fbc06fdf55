"""Pure functions from request records to numbers (MLPerf Inference definitions).

No I/O and no formatting: `RunResult` is the single source of every number the
verdict, the terminal table and the JSON report show.

Percentiles follow MLPerf LoadGen: `sorted(values)[int(n * p)]`, no interpolation
(so the p99 of 64 samples is their maximum).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

from pytest_tokperf.driver import ClientProc, RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.hardware.telemetry import Telemetry

NS = 1_000_000_000
PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99, "p999": 0.999}


def percentile(values: Sequence[float], p: float) -> float:
    """LoadGen's rule: the value at index int(n * p) of the sorted values."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"percentile {p} is outside [0, 1]")
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p), len(ordered) - 1)]


@dataclass(frozen=True)
class Distribution:
    """Percentiles of one per-request latency, in seconds (None: no samples)."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    p999: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None, None, None)
        points = {name: percentile(values, p) for name, p in PERCENTILES.items()}
        return cls(count=len(values), mean=sum(values) / len(values), **points)


NO_SAMPLES = Distribution(0, None, None, None, None, None, None)


def arrival_ns(record: RequestRecord) -> int:
    """When the request's latency starts: its scheduled arrival in server and interactive
    runs (as LoadGen measures, so a driver behind its schedule cannot hide its own delay),
    else when it was issued."""
    return record.issue_ns if record.scheduled_ns is None else record.scheduled_ns


def ttft_s(record: RequestRecord) -> float | None:
    """Time to first token: first chunk time - arrival (scheduled, else issue) time."""
    first = record.first_chunk_ns
    return None if first is None else (first - arrival_ns(record)) / NS


def e2e_s(record: RequestRecord) -> float:
    """End-to-end latency: completion time - arrival (scheduled, else issue) time."""
    return (record.end_ns - arrival_ns(record)) / NS


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first: (latency - TTFT) / (tokens - 1)."""
    first = record.first_chunk_ns
    if first is None or record.output_tokens < 2:
        return None
    return (record.end_ns - first) / NS / (record.output_tokens - 1)


def itl_s(record: RequestRecord) -> list[float]:
    """Inter-token latencies: the gaps between consecutive chunks of one request."""
    c = record.chunk_ns
    return [(b - a) / NS for a, b in itertools.pairwise(c)]


def lag_s(record: RequestRecord) -> float | None:
    """How late the driver issued a request against its seeded schedule (None: unscheduled)."""
    return None if record.scheduled_ns is None else (record.issue_ns - record.scheduled_ns) / NS


def meets(record: RequestRecord, limits: Mapping[str, float]) -> bool:
    """Whether one request met every per-request latency limit (seconds, keyed ttft/tpot/itl/e2e).

    A request's ITL is its largest gap; a one-token request has no TPOT or ITL, so
    those limits cannot fail it. A failed request, or one with no output, meets none.
    """
    if not record.ok or record.first_chunk_ns is None:
        return False  # failed, or completed without output: nothing was served
    observed = {
        "ttft": ttft_s(record),
        "tpot": tpot_s(record),
        "itl": max(itl_s(record), default=None),
        "e2e": e2e_s(record),
    }
    for metric, limit in limits.items():
        value = observed[metric]
        if value is not None and value > limit:
            return False
    return True


def goodput(records: Sequence[RequestRecord], limits: Mapping[str, float]) -> float:
    """Requests that met every SLO, per second of the run (first issue to last completion)."""
    span = span_ns(records)
    good = sum(1 for r in records if meets(r, limits))
    return good * NS / span if span > 0 else 0.0


def goodput_tokens(records: Sequence[RequestRecord], limits: Mapping[str, float]) -> float:
    """Output tokens of the requests that met every SLO, per second of the run (first
    issue to last completion): vLLM's and AIPerf's goodput, in tokens."""
    span = span_ns(records)
    good = sum(r.output_tokens for r in records if meets(r, limits))
    return good * NS / span if span > 0 else 0.0


def window_tokens_per_s(records: Sequence[RequestRecord], end_ns: int) -> float:
    """Output tokens of completed requests that arrived by `end_ns`, per second since the
    first issue: the rate while a run bounded by time applied its load."""
    if not records:
        return 0.0
    span = end_ns - min(r.issue_ns for r in records)
    tokens = sum(
        n
        for r in records
        if r.ok
        for at, n in zip(r.chunk_ns, r.chunk_tokens, strict=True)
        if at <= end_ns
    )
    return tokens * NS / span if span > 0 else 0.0


def span_ns(records: Sequence[RequestRecord]) -> int:
    """First issue to last completion: the span MLPerf's Offline rate is taken over."""
    if not records:
        return 0
    return max(r.end_ns for r in records) - min(r.issue_ns for r in records)


def output_tokens_per_s(records: Sequence[RequestRecord]) -> float:
    """Output tokens of the completed requests / (last end - first issue).

    This is MLPerf's Offline rate and also its Server rate (completed tokens / time the
    last query finished, counted from the start of the run).
    """
    span = span_ns(records)
    tokens = sum(r.output_tokens for r in records if r.ok)
    return tokens * NS / span if span > 0 else 0.0


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile by the Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5).

    Within 0.2% of the exact value for df >= 5 at the quantiles used here; the
    standard library has no t distribution and scipy is too heavy a dependency.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    z = NormalDist().inv_cdf(q)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def window_rates(
    records: Sequence[RequestRecord], batches: int, end_ns: int | None = None
) -> list[float]:
    """Output tokens/s in `batches` equal windows of [first issue, last end] (or `end_ns`).

    Tokens count when their chunk arrived, for completed requests only, so the mean of
    the window rates is exactly `output_tokens_per_s` (the MLPerf number), or
    `window_tokens_per_s` when the window ends at `end_ns`.
    """
    if not records or batches < 1:
        return []
    start = min(r.issue_ns for r in records)
    span = span_ns(records) if end_ns is None else end_ns - start
    if span <= 0:
        return []
    tokens = [0] * batches
    for r in records:
        if not r.ok:
            continue
        for at, n in zip(r.chunk_ns, r.chunk_tokens, strict=True):
            if end_ns is not None and at > end_ns:
                break  # arrived in the drain after the load stopped
            tokens[min(max(0, (at - start) * batches // span), batches - 1)] += n
    width_s = span / batches / NS
    return [t / width_s for t in tokens]


def token_windows(records: Sequence[RequestRecord], batches: int) -> list[float]:
    """Output tokens/s in `batches` windows of equal *work*: window j runs from the chunk
    that brought the output to j/batches of its tokens to the one that brought it to
    (j+1)/batches (window 0 from the first issue). Two runs of the same requests then
    compare the same tokens window by window, whatever their speed: a window boundary
    never cuts a prefill or a burst differently in the two. Completed requests only;
    [] when a chunk too large to split leaves a window empty."""
    chunks = sorted(
        (at, n) for r in records if r.ok for at, n in zip(r.chunk_ns, r.chunk_tokens, strict=True)
    )
    total = sum(n for _, n in chunks)
    if batches < 1 or total < batches:
        return []
    rates: list[float] = []
    start, count, done = min(r.issue_ns for r in records), 0, 0
    for at, n in chunks:
        count += n
        if count * batches >= (len(rates) + 1) * total:  # reached the next boundary
            if at <= start or count * batches >= (len(rates) + 2) * total:
                return []  # a window without time, or a chunk spanning two windows
            rates.append((count - done) / ((at - start) / NS))
            start, done = at, count
    return rates


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval around an estimate."""

    estimate: float
    low: float
    high: float
    confidence: float
    batches: int


BATCHES = 10  # the fixed windows of an Offline run (Schmeiser 1982: 10 to 30 batches)
MIN_WINDOW_REQUESTS = 5  # completed requests per batch window, on average
MIN_WINDOW_LATENCIES = 2.0  # mean request latencies per batch window
MIN_BATCHES = 6  # fewer independent batches give no interval: the verdict is INCONCLUSIVE
LAG1_Z = NormalDist().inv_cdf(0.9)  # lag-1 autocorrelation test, one-sided at 10%


def batch_means(values: Sequence[float], confidence: float) -> Interval | None:
    """Student-t interval of the mean of batch means (None: fewer than 2 batches)."""
    k = len(values)
    if k < 2:
        return None
    mean = sum(values) / k
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = t_quantile((1 + confidence) / 2, k - 1) * sd / math.sqrt(k)
    return Interval(mean, mean - half, mean + half, confidence, k)


def lag1(values: Sequence[float]) -> float | None:
    """Lag-1 autocorrelation of a series (None: fewer than 3 values or no variation)."""
    k = len(values)
    if k < 3:
        return None
    mean = sum(values) / k
    dev = [v - mean for v in values]
    var = sum(d * d for d in dev)
    if var == 0:
        return None
    return sum(a * b for a, b in itertools.pairwise(dev)) / var


def correlated(values: Sequence[float]) -> bool:
    """Whether adjacent values are positively correlated at the 10% level.

    Independent values have r1 about -1/k with standard deviation 1/sqrt(k); positive
    correlation makes batch means understate the spread, so only that side is tested.
    """
    r1 = lag1(values)
    k = len(values)
    return r1 is not None and r1 + 1 / k > LAG1_Z / math.sqrt(k)


@dataclass(frozen=True)
class Batches:
    """The windows of a throughput interval: equal, consecutive, after the warm-up ramp."""

    rates: tuple[float, ...]  # output tokens/s per window, in time order
    start_ns: int = 0  # the first window's start (the end of the ramp)
    width_ns: int = 0
    merges: int = 0  # halvings of the window count until lag-1 was insignificant
    lag1: float | None = None  # still correlated where a halving would leave too few


def rates_between(records: Sequence[RequestRecord], start: int, end: int, k: int) -> list[float]:
    """Output tokens/s of completed requests in `k` equal windows of [start, end]."""
    tokens = [0] * k
    span = end - start
    for r in records:
        if not r.ok:
            continue
        for at, n in zip(r.chunk_ns, r.chunk_tokens, strict=True):
            if start <= at <= end:
                tokens[min((at - start) * k // span, k - 1)] += n
    return [t * k * NS / span for t in tokens]


def batch_rates(
    records: Sequence[RequestRecord], end_ns: int | None = None, *, merge: bool = True
) -> Batches:
    """Window rates for a throughput interval that stays honest under bursty engines.

    The ramp (the first mean request latency after the first issue) is left out; each
    window spans at least `MIN_WINDOW_LATENCIES` mean latencies and, on average,
    `MIN_WINDOW_REQUESTS` completions, so one request's tokens rarely straddle many
    windows; while the window rates are correlated at lag 1, adjacent windows are
    merged (`independent`). Fewer than `MIN_BATCHES` rates left: no interval.
    Requests count as completed when they ended before the window's end (`end_ns`, or
    the last end: a snapshot's in-flight requests end there and are not completions).
    """
    if not records:
        return Batches(())
    start = min(r.issue_ns for r in records)
    end = max(r.end_ns for r in records) if end_ns is None else end_ns
    done = [r for r in records if r.ok and r.end_ns < end]
    if not done:
        return Batches(())
    latency = sum(r.end_ns - r.issue_ns for r in done) / len(done)
    ramp_end = start + math.ceil(latency)
    completions = sum(1 for r in done if r.end_ns > ramp_end)
    span = end - ramp_end
    if span <= 0 or completions == 0:
        return Batches(())
    width = max(MIN_WINDOW_LATENCIES * latency, MIN_WINDOW_REQUESTS * span / completions)
    return independent(records, ramp_end, end, int(span // width), merge=merge)


def independent(
    records: Sequence[RequestRecord], start: int, end: int, k: int, *, merge: bool = True
) -> Batches:
    """The rates of `k` equal windows of [start, end], adjacent windows merged (the count
    halved) while they are correlated at lag 1 and a halving leaves `MIN_BATCHES`; still
    correlated then, they keep their lag-1, which widens the interval (`interval_of`)."""
    merges = 0
    rates = rates_between(records, start, end, k) if k else []
    while merge and len(rates) >= MIN_BATCHES and correlated(rates):
        if k // 2 < MIN_BATCHES:
            return Batches(tuple(rates), start, (end - start) // k, merges, lag1(rates))
        k //= 2
        merges += 1
        rates = rates_between(records, start, end, k)
    return Batches(tuple(rates), start, (end - start) // max(k, 1), merges)


def interval_of(batches: Batches, confidence: float) -> Interval | None:
    """Batch-means interval, or None when fewer than `MIN_BATCHES` batches remain; batches
    still correlated at lag 1 get the wider interval of `correlated_means`."""
    if len(batches.rates) < MIN_BATCHES:
        return None
    if batches.lag1 is not None:
        return correlated_means(batches.rates, batches.lag1, confidence)
    return batch_means(batches.rates, confidence)


def correlated_means(values: Sequence[float], r1: float, confidence: float) -> Interval | None:
    """Interval of the mean of `values` correlated at lag 1, as an AR(1) series.

    A series with lag-1 autocorrelation r has Var(mean) = sigma^2 c / k, with
    c = 1 + 2 sum_{j<k} (1 - j/k) r^j, and its sample variance s^2 estimates
    sigma^2 (k - c) / (k - 1), not sigma^2; so Var(mean) is estimated by
    s^2 c (k - 1) / (k (k - c)), with k / c - 1 degrees of freedom (the effective count
    of independent values, less one). r is the estimate plus 1/k (a lag-1 estimate from
    k values is biased low by about that), at most 0.9. Fewer than 2 degrees of freedom
    (or c >= k): None, no interval.
    """
    k = len(values)
    r = min(max(r1 + 1 / k, 0.0), 0.9)
    c = 1 + 2 * sum((1 - j / k) * r**j for j in range(1, k))
    df = int(k / c) - 1
    if c >= k or df < 2:
        return None
    mean = sum(values) / k
    s2 = sum((v - mean) ** 2 for v in values) / (k - 1)
    half = t_quantile((1 + confidence) / 2, df) * math.sqrt(s2 * c * (k - 1) / (k * (k - c)))
    return Interval(mean, mean - half, mean + half, confidence, k)


def throughput_interval(
    records: Sequence[RequestRecord],
    confidence: float,
    batches: int | None = None,
    end_ns: int | None = None,
) -> Interval | None:
    """Confidence interval of the steady-state output tokens/s by batch means over time.

    Token production is autocorrelated in time (one request spans many windows, a slow
    phase many requests), so resampling requests independently (a bootstrap) would
    understate the spread; `batch_rates` picks long, uncorrelated windows and gives
    None when too few remain. `batches=N` instead cuts [first issue, last end] into N
    equal windows (the Offline treatment of a fixed workload).
    """
    if batches is not None:
        return batch_means(window_rates(records, batches, end_ns), confidence)
    return interval_of(batch_rates(records, end_ns), confidence)


@dataclass(frozen=True)
class RunResult:
    """One measured run: its settings, its records and every number derived from them."""

    scenario: str
    workload: str
    max_tokens: int | None
    engine: EngineInfo
    records: tuple[RequestRecord, ...]
    requests: int
    failed: int
    output_tokens: int
    duration_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    requests_per_s: float
    tokens_per_sample: float
    ttft: Distribution
    tpot: Distribution
    e2e: Distribution
    # from the telemetry sampled during the run (None: not measured on this hardware)
    telemetry: Telemetry | None = None
    energy_j_per_token: float | None = None  # all allocated GPUs' energy / output tokens
    tokens_per_s_per_watt: float | None = None  # tokens/s / mean power of those GPUs
    throttled: bool | None = None  # the GPUs slowed their clocks during the run
    client_busy_cores: float | None = None  # this process's CPU time / run time
    itl: Distribution = NO_SAMPLES
    qps: float | None = None  # the server scenario's target rate
    concurrency: int | None = None  # the concurrency scenario's requests in flight
    lag: Distribution = NO_SAMPLES  # issue time - scheduled time (server)
    scheduled_qps: float | None = None  # the seeded schedule's own rate
    achieved_qps: float | None = None  # completions per second net of one request's latency
    client_cpu: float | None = None  # driver thread CPU time / wall time
    stopped: str = ""  # why the driver stopped issuing (early stopping, duration, count)
    window_end_ns: int | None = None  # a run bounded by time: when it stopped issuing
    token_counting: Mapping[str, int] = field(default_factory=dict)  # requests per method
    client_procs: tuple[ClientProc, ...] = ()  # the client processes that drove the run
    server: Mapping[str, Any] | None = None  # the server's own counters (server_metrics)
    allowed_failures: int = 0  # failed requests the test allows this run (allow_failures=)
    min_duration_s: float = 0.0  # the least this run had to last to PASS a floor or SLO
    # the prefix cache over the run: hit_rate, hits, queries, source, band (cache.py)
    cache: Mapping[str, Any] | None = None

    @property
    def errors(self) -> list[str]:
        return [f"{r.id}: {r.error}" for r in self.records if r.error is not None]

    def throughput_interval(self, confidence: float) -> Interval | None:
        """Interval of `tokens_per_s`; scale it by 1/devices for the per-GPU number."""
        batches = BATCHES if self.scenario == "offline" else None
        return throughput_interval(self.records, confidence, batches, self.window_end_ns)

    def goodput(self, limits: Mapping[str, float]) -> float:
        return goodput(self.records, limits)

    def goodput_tokens(self, limits: Mapping[str, float]) -> float:
        return goodput_tokens(self.records, limits)


def scheduled_rate(records: Sequence[RequestRecord]) -> float | None:
    """Requests per second of the seeded schedule itself: (n - 1) / (last - first arrival).

    A short Poisson sample legitimately deviates from the nominal qps, so whether the
    engine kept up is judged against this rate, not the nominal one.
    """
    times = sorted(r.scheduled_ns for r in records if r.scheduled_ns is not None)
    if len(times) < 2 or times[-1] == times[0]:
        return None
    return (len(times) - 1) * NS / (times[-1] - times[0])


def achieved_rate(records: Sequence[RequestRecord]) -> float | None:
    """Completed requests per second, over first arrival .. last completion less the median latency.

    Taking off the median latency removes the drain of the last requests when the
    engine keeps up; when it falls behind, latencies grow along the run, the last
    completion lags the last arrival by about twice the median and the rate drops
    below the schedule's.
    """
    times = [r.scheduled_ns for r in records if r.scheduled_ns is not None]
    ok = [r for r in records if r.ok]
    if len(times) < 2 or not ok:
        return None
    latencies = sorted(r.end_ns - r.issue_ns for r in ok)
    median = latencies[len(latencies) // 2]
    end = max(max(r.end_ns for r in ok) - median, max(times))
    span = end - min(times)
    return (len(ok) - 1) * NS / span if span > 0 else None


def summarize(
    records: Sequence[RequestRecord],
    engine: EngineInfo,
    *,
    scenario: str,
    workload: str,
    max_tokens: int | None,
    qps: float | None = None,
    concurrency: int | None = None,
    client_cpu: float | None = None,
    stopped: str = "",
    window_end_ns: int | None = None,
) -> RunResult:
    """Every number of a run, from its records (and the driver's own CPU share).

    A run bounded by time (`window_end_ns` set) takes its rates over the window the
    load was applied; a run of a fixed count over first issue .. last completion.
    """
    ok = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    if window_end_ns is not None and records:
        duration = (window_end_ns - min(r.issue_ns for r in records)) / NS
        rate = window_tokens_per_s(records, window_end_ns)
    else:
        duration = span_ns(records) / NS
        rate = output_tokens_per_s(records)
    return RunResult(
        scenario=scenario,
        workload=workload,
        max_tokens=max_tokens,
        engine=engine,
        records=tuple(records),
        requests=len(records),
        failed=len(records) - len(ok),
        output_tokens=tokens,
        duration_s=duration,
        tokens_per_s=rate,
        tokens_per_s_per_gpu=rate / engine.devices,
        requests_per_s=(
            sum(1 for r in ok if window_end_ns is None or r.end_ns <= window_end_ns) / duration
            if duration > 0
            else 0.0
        ),
        tokens_per_sample=tokens / len(ok) if ok else 0.0,
        ttft=Distribution.of([v for r in ok if (v := ttft_s(r)) is not None]),
        tpot=Distribution.of([v for r in ok if (v := tpot_s(r)) is not None]),
        e2e=Distribution.of([e2e_s(r) for r in ok]),
        itl=Distribution.of([v for r in ok for v in itl_s(r)]),
        qps=qps,
        concurrency=concurrency,
        lag=Distribution.of([v for r in records if (v := lag_s(r)) is not None]),
        scheduled_qps=scheduled_rate(records),
        achieved_qps=achieved_rate(records),
        client_cpu=client_cpu,
        stopped=stopped,
        window_end_ns=window_end_ns,
    )


def energy_per_token(energy_j: float | None, output_tokens: int) -> float | None:
    """Joules per output token over the run; None without an energy reading or tokens."""
    if energy_j is None or output_tokens <= 0:
        return None
    return energy_j / output_tokens


def tokens_per_watt(tokens_per_s: float, mean_power_w: float | None) -> float | None:
    """Output tokens/s per watt drawn by the GPUs (= tokens per joule)."""
    if mean_power_w is None or mean_power_w <= 0:
        return None
    return tokens_per_s / mean_power_w


def with_telemetry(result: RunResult, telemetry: Telemetry) -> RunResult:
    """`result` with the numbers derived from the telemetry of its run."""
    gpu = telemetry.gpu
    return replace(
        result,
        telemetry=telemetry,
        energy_j_per_token=energy_per_token(gpu.energy_j if gpu else None, result.output_tokens),
        tokens_per_s_per_watt=tokens_per_watt(
            result.tokens_per_s, gpu.mean_power_w if gpu else None
        ),
        throttled=gpu.throttled if gpu else None,
        client_busy_cores=telemetry.cpu.busy_cores,
    )
