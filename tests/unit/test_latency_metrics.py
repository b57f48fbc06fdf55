"""ITL, goodput, schedule rates and throughput intervals, each against a calculation by hand."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.metrics import (
    NS,
    achieved_rate,
    batch_means,
    correlated,
    correlated_means,
    e2e_s,
    goodput,
    goodput_tokens,
    itl_s,
    lag1,
    lag_s,
    meets,
    output_tokens_per_s,
    scheduled_rate,
    summarize,
    t_quantile,
    throughput_interval,
    token_windows,
    tpot_s,
    ttft_s,
    window_rates,
    window_tokens_per_s,
)

INFO = EngineInfo("test", "m", "f16", devices=2)


def rec(issue: int, chunks: list[int], *, tokens=None, error=None, scheduled=None, id="r"):
    return RequestRecord(
        id=id,
        issue_ns=issue,
        end_ns=chunks[-1] if chunks else issue + 1,
        chunk_ns=tuple(chunks),
        chunk_tokens=tuple(tokens if tokens is not None else [1] * len(chunks)),
        error=error,
        scheduled_ns=scheduled,
    )


def test_itl_is_the_gaps_between_chunks() -> None:
    r = rec(0, [10, 30, 60, 100])
    assert itl_s(r) == pytest.approx([20 / NS, 30 / NS, 40 / NS])
    assert itl_s(rec(0, [5])) == []
    assert itl_s(rec(0, [])) == []


def test_tpot_edge_cases() -> None:
    # two tokens: (end - first) / 1
    assert tpot_s(rec(0, [NS, 3 * NS])) == pytest.approx(2.0)
    # one chunk carrying 3 tokens: (end - first) = 0 over 2 tokens
    assert tpot_s(rec(0, [NS], tokens=[3])) == 0.0
    # one token: no time per output token after the first
    assert tpot_s(rec(0, [NS])) is None
    # a request that produced nothing
    assert tpot_s(rec(0, [])) is None


def test_summary_of_one_token_failed_and_zero_requests() -> None:
    one = rec(0, [NS], id="one")
    many = rec(0, [NS, 2 * NS, 3 * NS], id="many")
    failed = rec(0, [NS // 2, 5 * NS], error="boom", id="failed")
    res = summarize([one, many, failed], INFO, scenario="server", workload="w", max_tokens=None)
    assert res.tpot.count == 1 and res.tpot.p50 == pytest.approx(1.0)  # only "many"
    assert res.ttft.count == 2  # failed requests have no latency samples
    assert res.itl.count == 2 and res.itl.p99 == pytest.approx(1.0)
    assert res.output_tokens == 4
    empty = summarize([], INFO, scenario="server", workload="w", max_tokens=None)
    assert (empty.requests, empty.output_tokens, empty.tokens_per_s) == (0, 0, 0.0)
    assert empty.ttft.p99 is None and empty.tpot.count == 0 and empty.itl.count == 0
    assert empty.scheduled_qps is None and empty.achieved_qps is None
    assert empty.throughput_interval(0.95) is None


def test_goodput_counts_requests_meeting_every_limit() -> None:
    fast = rec(0, [NS // 10, NS // 5])  # TTFT 0.1, TPOT 0.1, ITL 0.1, E2E 0.2
    slow_start = rec(0, [NS, NS + NS // 10])  # TTFT 1.0
    stall = rec(0, [NS // 10, NS // 5, 2 * NS])  # ITL 1.8, TPOT 0.95
    one = rec(0, [NS // 10])  # one token: no TPOT or ITL to miss
    failed = rec(0, [NS // 10, 2 * NS], error="x")
    empty = rec(0, [])  # completed without output: no first token was served
    limits = {"ttft": 0.5, "tpot": 0.5, "itl": 0.5}
    assert [meets(r, limits) for r in (fast, slow_start, stall, one, failed, empty)] == [
        True,
        False,
        False,
        True,
        False,
        False,
    ]
    records = [fast, slow_start, stall, one, failed, empty]
    span = 2.0  # first issue 0 .. last end 2 s
    assert goodput(records, limits) == pytest.approx(2 / span)
    assert goodput(records, {"e2e": 10.0}) == pytest.approx(4 / span)
    assert goodput([], limits) == 0.0
    # in tokens: fast (2 tokens) and one (1 token) met every limit, over the same 2 s
    assert goodput_tokens(records, limits) == pytest.approx((2 + 1) / span)
    # E2E <= 10 s: the four that served anything (2 + 2 + 3 + 1 tokens)
    assert goodput_tokens(records, {"e2e": 10.0}) == pytest.approx(8 / span)
    assert goodput_tokens([], limits) == 0.0


def test_lag_and_schedule_rates_by_hand() -> None:
    # arrivals scheduled at 0, 1, 2, 3 s; issued 1 ms late; each takes 0.5 s
    recs = [
        rec(k * NS + NS // 1000, [k * NS + NS // 2], scheduled=k * NS, id=f"r{k}") for k in range(4)
    ]
    assert [lag_s(r) for r in recs] == pytest.approx([0.001] * 4)
    assert lag_s(rec(0, [1])) is None
    assert scheduled_rate(recs) == pytest.approx(3 / 3.0)
    # the last end (3.5 s) less the median latency (0.499 s) is about the last arrival (3 s)
    assert achieved_rate(recs) == pytest.approx(3 / (3.5 - 0.499), rel=1e-6)
    assert scheduled_rate([rec(0, [1], scheduled=0)]) is None


def test_achieved_rate_falls_when_the_engine_falls_behind() -> None:
    # one request per 0.1 s scheduled, but the engine serves one per second, in order
    recs = [
        rec(k * NS // 10, [(k + 1) * NS], scheduled=k * NS // 10, id=f"r{k}") for k in range(10)
    ]
    assert scheduled_rate(recs) == pytest.approx(10.0)
    achieved = achieved_rate(recs)
    assert achieved is not None and achieved < 0.5 * 10.0


def test_t_quantiles_match_the_table() -> None:
    # Student's t, two-sided 95% (and one 99%), from any statistics table
    for df, exact in ((5, 2.5706), (9, 2.2622), (19, 2.0930), (29, 2.0452), (120, 1.9799)):
        assert t_quantile(0.975, df) == pytest.approx(exact, rel=2e-3)
    assert t_quantile(0.995, 9) == pytest.approx(3.2498, rel=5e-3)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


@given(st.lists(st.floats(0, 1e6), min_size=2, max_size=40), st.sampled_from([0.9, 0.95, 0.99]))
def test_batch_means_interval_against_statistics(values: list[float], conf: float) -> None:
    iv = batch_means(values, conf)
    assert iv is not None
    mean = statistics.fmean(values)
    half = t_quantile((1 + conf) / 2, len(values) - 1) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    assert iv.estimate == pytest.approx(mean, rel=1e-9, abs=1e-6)
    assert iv.low == pytest.approx(mean - half, rel=1e-6, abs=1e-3)
    assert iv.high == pytest.approx(mean + half, rel=1e-6, abs=1e-3)
    assert batch_means(values[:1], conf) is None


@given(
    st.lists(st.floats(0, 1e6), min_size=6, max_size=11),
    st.floats(-0.5, 0.95),
    st.sampled_from([0.9, 0.95]),
)
def test_correlated_means_against_the_covariance_of_an_ar1_mean(
    values: list[float], r1: float, conf: float
) -> None:
    # by the covariance matrix, not the closed form: with rho_ij = r^|i-j|,
    # Var(mean) = sigma^2 v with v = sum rho_ij / k^2, and E[s^2] = sigma^2 (k - k v)/(k - 1)
    k = len(values)
    r = min(max(r1 + 1 / k, 0.0), 0.9)
    v = sum(r ** abs(i - j) for i in range(k) for j in range(k)) / k**2
    iv = correlated_means(values, r1, conf)
    df = math.floor(1 / v + 1e-9) - 1
    if df < 2:
        assert iv is None
        return
    assert iv is not None
    var_mean = statistics.variance(values) * (k - 1) / (k - k * v) * v
    half = t_quantile((1 + conf) / 2, df) * math.sqrt(var_mean)
    assert iv.low == pytest.approx(statistics.fmean(values) - half, rel=1e-6, abs=1e-3)
    assert iv.high == pytest.approx(statistics.fmean(values) + half, rel=1e-6, abs=1e-3)


def test_correlated_means_cover_the_mean_of_flagged_ar1_series() -> None:
    """Series the lag-1 test flags (11 values, AR(1) with r = 0.5): the corrected
    interval covers the true mean at least as often as promised; plain batch means,
    which treat them as independent, do not."""
    rng = random.Random(7)
    covered = plain = n = 0
    while n < 1000:
        x, values = rng.gauss(0, 1) / math.sqrt(0.75), []
        for _ in range(11):
            x = 0.5 * x + rng.gauss(0, 1)
            values.append(10 + x)
        if not correlated(values):
            continue
        iv = correlated_means(values, lag1(values) or 0.0, 0.95)
        if iv is None:
            continue
        n += 1
        covered += iv.low <= 10 <= iv.high
        p = batch_means(values, 0.95)
        plain += p is not None and p.low <= 10 <= p.high
    assert covered / n >= 0.95
    assert plain / n < 0.85


@st.composite
def runs(draw: st.DrawFn) -> list[RequestRecord]:
    out = []
    for i in range(draw(st.integers(1, 12))):
        issue = draw(st.integers(0, 10**9))
        gaps = draw(st.lists(st.integers(1, 10**8), min_size=1, max_size=20))
        chunks = [issue + sum(gaps[: k + 1]) for k in range(len(gaps))]
        tokens = draw(st.lists(st.integers(1, 8), min_size=len(gaps), max_size=len(gaps)))
        out.append(rec(issue, chunks, tokens=tokens, id=f"r{i}"))
    return out


@given(runs(), st.integers(1, 30))
def test_window_rates_average_to_the_reported_rate(recs: list[RequestRecord], k: int) -> None:
    rates = window_rates(recs, k)
    assert len(rates) == k
    assert statistics.fmean(rates) == pytest.approx(output_tokens_per_s(recs), rel=1e-9)
    iv = throughput_interval(recs, 0.95, batches=k)
    if k >= 2:
        assert iv is not None and iv.low <= output_tokens_per_s(recs) * (1 + 1e-9) + 1e-9


def test_window_rates_by_hand() -> None:
    # 1 s span in 4 windows: tokens at 0.1, 0.2 (window 0), 0.6 (window 2), 1.0 (last)
    r = rec(0, [NS // 10, NS // 5, 6 * NS // 10, NS], tokens=[1, 2, 3, 4])
    assert window_rates([r], 4) == pytest.approx([3 * 4, 0, 3 * 4, 4 * 4])
    # a window ending at 0.5 s: only the first two chunks count
    assert window_rates([r], 2, end_ns=NS // 2) == pytest.approx([3 / 0.25, 0])
    assert window_tokens_per_s([r], NS // 2) == pytest.approx(3 / 0.5)
    failed = rec(0, [NS // 10], error="x")
    assert window_rates([r, failed], 4) == window_rates([r], 4)


def test_token_windows_by_hand() -> None:
    # 8 tokens in 4 windows of 2 tokens: boundaries at the chunks bringing 2, 4, 6, 8
    r = rec(0, [NS // 10, NS // 5, NS // 2, NS, 2 * NS], tokens=[1, 1, 2, 2, 2])
    # [0, 0.2 s]: 2 tokens; [0.2, 0.5]: 2; [0.5, 1.0]: 2; [1.0, 2.0]: 2
    assert token_windows([r], 4) == pytest.approx([2 / 0.2, 2 / 0.3, 2 / 0.5, 2 / 1.0])
    # a chunk of 4 tokens fills two windows at one instant: no windows of equal work
    assert token_windows([rec(0, [NS, 2 * NS], tokens=[4, 4])], 4) == []
    assert token_windows([r, rec(0, [NS // 20], error="x")], 4) == token_windows([r], 4)


@given(runs(), st.integers(1, 12))
def test_token_windows_hold_equal_work(recs: list[RequestRecord], k: int) -> None:
    """Every window's tokens x its time add up to the run's tokens and time, and each
    holds at least its share of the tokens (never a boundary inside a chunk)."""
    rates = token_windows(recs, k)
    if not rates:
        return
    chunks = sorted(
        (at, n) for r in recs if r.ok for at, n in zip(r.chunk_ns, r.chunk_tokens, strict=True)
    )
    total = sum(n for _, n in chunks)
    # the window's boundaries from the cumulative sum, independently of the function
    ends, count = [], 0
    for at, n in chunks:
        count += n
        if count * k >= (len(ends) + 1) * total:
            ends.append((at, count))
    start, done = min(r.issue_ns for r in recs), 0
    for rate, (end, reached) in zip(rates, ends, strict=True):
        assert rate * (end - start) / NS == pytest.approx(reached - done)
        start, done = end, reached
    assert len(rates) == k and done == total


def test_time_bounded_run_rates_over_its_window() -> None:
    r = rec(0, [NS // 4, NS // 2, NS, 2 * NS])  # the last two tokens arrive after the stop
    res = summarize(
        [r], INFO, scenario="concurrency", workload="w", max_tokens=None, window_end_ns=NS // 2
    )
    assert res.duration_s == pytest.approx(0.5)
    assert res.tokens_per_s == pytest.approx(2 / 0.5)
    assert res.tokens_per_s_per_gpu == pytest.approx(2 / 0.5 / 2)
    assert res.output_tokens == 4  # every completed token is still reported
    assert res.requests_per_s == 0.0  # the one request completed after the window


def test_server_latency_counts_from_the_scheduled_arrival() -> None:
    # scheduled at 1 s, issued 80 ms late, first token 50 ms later, done at 1.2 s
    late = rec(NS + 80 * NS // 1000, [NS + 130 * NS // 1000, NS + NS // 5], scheduled=NS)
    assert ttft_s(late) == pytest.approx(0.130)  # the driver's delay counts
    assert e2e_s(late) == pytest.approx(0.200)
    assert tpot_s(late) == pytest.approx(0.070)  # after the first token: unchanged
    assert lag_s(late) == pytest.approx(0.080)  # and the lag is reported on its own
    assert not meets(late, {"ttft": 0.1}) and meets(late, {"ttft": 0.15})
    unscheduled = rec(NS, [NS + 50 * NS // 1000])
    assert ttft_s(unscheduled) == pytest.approx(0.050)  # offline, concurrency: from issue
    res = summarize([late], INFO, scenario="server", workload="w", max_tokens=None, qps=1.0)
    assert res.ttft.p99 == pytest.approx(0.130) and res.lag.p99 == pytest.approx(0.080)
