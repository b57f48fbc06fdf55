"""latency_slo parsing, validity (INVALID) and interval verdicts (PASS/FAIL/INCONCLUSIVE)."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.markers import parse_slo_marker
from pytest_tokperf.metrics import (
    NS,
    Interval,
    batch_rates,
    correlated,
    lag1,
    summarize,
    throughput_interval,
)
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.sequential import Sequential
from pytest_tokperf.slo import (
    SLO_KEYWORDS,
    per_request_limits,
    samples_needed,
    slo_checks,
    slo_parts,
)
from pytest_tokperf.verdict import floor_status, floors_for, judge, per_look, validity

WHERE = "test_x.py::test_slo"
INFO = EngineInfo("t", "m", "p", 1)


def test_slo_keywords_and_dicts() -> None:
    assert parse_slo_marker((), {"ttft_p99_ms": 2000, "tpot_p50_ms": None}, WHERE, BUILTIN) == {
        "ttft_p99_ms": 2000.0
    }
    assert parse_slo_marker((), {"itl_p999_ms": {"cpu": 50}}, WHERE, BUILTIN) == {
        "itl_p999_ms": {"cpu": 50.0}
    }
    assert "e2e_p95_ms" in SLO_KEYWORDS and len(SLO_KEYWORDS) == 4 * 5
    assert slo_parts("tpot_p999_ms") == ("tpot", "p999")


@pytest.mark.parametrize(
    ("args", "kwargs", "says"),
    [
        ((450,), {}, "positional"),
        ((), {"ttft_p98_ms": 1}, "unknown keywords ttft_p98_ms"),
        ((), {"ttft_ms": 1}, "takes keywords ttft_p50_ms, ttft_p90_ms"),
        ((), {"ttft_p99_ms": 0}, "a latency limit must be a positive number, got 0"),
        ((), {"ttft_p99_ms": float("inf")}, "a latency limit must be a positive number"),
        ((), {"ttft_p99_ms": "2s"}, "expected a number"),
        ((), {"ttft_p99_ms": {"gb300": 450}}, "latency_slo(ttft_p99_ms=...) names unknown"),
    ],
)
def test_bad_slo_arguments_are_usage_errors(args, kwargs, says) -> None:
    with pytest.raises(pytest.UsageError, match=WHERE) as info:
        parse_slo_marker(args, kwargs, WHERE, BUILTIN)
    assert says in str(info.value)


def test_slo_dict_without_this_profile_skips() -> None:
    bounds = parse_slo_marker((), {"ttft_p99_ms": {"gb300-nvl72": 450}}, WHERE, BUILTIN)
    reason = floors_for(bounds, "cpu", {}, marker="latency_slo")
    assert (
        reason
        == "latency_slo(ttft_p99_ms=...) sets no limit for profile 'cpu' (it has gb300-nvl72)"
    )


def test_profile_slo_defaults_follow_mlperf() -> None:
    # MLPerf Inference rules, Llama-2-70B: Server p99 TTFT 2 s / TPOT 200 ms;
    # Interactive 450 / 40 ms
    for name in ("h100-sxm", "gb200-nvl72", "gb300-nvl72"):
        assert BUILTIN[name].slos["server"] == {"ttft_p99_ms": 2000.0, "tpot_p99_ms": 200.0}
        assert BUILTIN[name].slos["interactive"] == {"ttft_p99_ms": 450.0, "tpot_p99_ms": 40.0}
    for key in BUILTIN["cpu"].slos["interactive"]:
        slo_parts(key)  # every default is a valid keyword


def test_samples_needed_is_loadgens_early_stopping_with_no_overs() -> None:
    assert samples_needed(0.99) == 459  # LoadGen's figure for p99 at 99%
    assert samples_needed(0.90) == 44
    assert samples_needed(0.50) == 7
    # independently: n is the first count with p**n <= 1%
    for p in (0.5, 0.9, 0.95, 0.99):
        n = samples_needed(p)
        assert p**n <= 0.01 < p ** (n - 1)


def test_per_request_limits_take_the_tightest() -> None:
    assert per_request_limits({"ttft_p99_ms": 2000, "ttft_p50_ms": 500, "tpot_p99_ms": 40}) == {
        "ttft": 0.5,
        "tpot": 0.04,
    }


def test_floor_status_from_the_interval() -> None:
    iv = Interval(100.0, 90.0, 110.0, 0.95, 10)
    assert floor_status(iv, 100.0, 90.0) == "PASS"  # the lower bound clears the floor
    assert floor_status(iv, 100.0, 111.0) == "FAIL"  # the upper bound is below it
    assert floor_status(iv, 100.0, 100.0) == "INCONCLUSIVE"
    # no interval (too few independent batches): nothing is decided
    assert floor_status(None, 5.0, 5.0) == "INCONCLUSIVE"
    assert floor_status(None, 4.9, 5.0) == "INCONCLUSIVE"
    assert per_look(0.95, 5) == pytest.approx(0.99)
    assert per_look(0.95, 1) == pytest.approx(0.95)


def _noisy(rates: list[int]) -> list[RequestRecord]:
    """Ten requests (the fewest an Offline floor takes) whose tokens together arrive
    `rates[i]` per 0.1 s window, mid-window: request j gets every tenth token."""
    chunks: list[int] = []
    for i, n in enumerate(rates):
        chunks += [i * NS // 10 + (2 * k + 1) * NS // (20 * n) for k in range(n)]
    end = len(rates) * NS // 10
    return [
        RequestRecord(f"r{j}", 0, end, tuple(chunks[j::10]), (1,) * len(chunks[j::10]))
        for j in range(10)
    ]


def _summary(records, **kw):
    return summarize(records, INFO, scenario="offline", workload="w", max_tokens=None, **kw)


def test_judge_pass_fail_inconclusive_on_noisy_windows() -> None:
    res = _summary(_noisy([8, 12] * 5))  # 100 tokens/s, windows at 80 and 120
    assert res.tokens_per_s == pytest.approx(100.0)
    assert judge(res, {"min_tokens_per_s": 80.0}).status == "PASS"
    assert judge(res, {"min_tokens_per_s": 120.0}).status == "FAIL"
    v = judge(res, {"min_tokens_per_s": 100.0})
    assert v.status == "INCONCLUSIVE"
    (check,) = v.failed
    assert check.status == "INCONCLUSIVE" and check.ci_low < 100.0 < check.ci_high
    # 95%: 100 +/- 2.262 * 21.08 / sqrt(10) = 84.9 .. 115.1; over 5 looks each is at 99%:
    # 100 +/- 3.250 * 21.08 / sqrt(10) = 78.3 .. 121.7
    assert judge(res, {"min_tokens_per_s": 84.0}).status == "PASS"
    assert judge(res, {"min_tokens_per_s": 84.0}, looks=5).status == "INCONCLUSIVE"
    assert judge(res, {"min_tokens_per_s": 78.0}, looks=5).status == "PASS"


def _server_result(**changes: object):
    records = [
        RequestRecord(
            f"r{k}", k * NS, k * NS + NS // 2, (k * NS + NS // 4,), (1,), scheduled_ns=k * NS
        )
        for k in range(50)
    ]
    res = summarize(records, INFO, scenario="server", workload="w", max_tokens=None, qps=1.0)
    return dataclasses.replace(res, **changes)


def test_a_valid_server_run_passes_its_slos() -> None:
    res = _server_result(client_cpu=0.1)
    assert validity(res, {"ttft_p90_ms": 300}) == ()
    v = judge(res, {}, {"ttft_p90_ms": 300, "e2e_p50_ms": 600})
    assert v.status == "PASS"
    assert judge(res, {}, {"ttft_p90_ms": 200}).status == "FAIL"


def test_too_few_samples_for_the_percentile_is_invalid() -> None:
    res = _server_result()
    (reason,) = validity(res, {"ttft_p99_ms": 2000})
    assert reason == (
        "TTFT p99: 0 of 50 requests over 2,000 ms; LoadGen's early-stopping estimate needs "
        "at least 459 requests with 0 over (or fewer over) to accept p99 at 99% confidence "
        "(observed p99 250 ms, early-stopping estimate -)"
    )
    v = judge(res, {}, {"ttft_p99_ms": 2000})
    assert v.status == "INVALID" and v.invalid == (reason,)


def _slow_firsts(n: int, slow: int, failed: int = 0, ttft_ms: int = 2500) -> list[RequestRecord]:
    """`n` requests scheduled 0.1 s apart and issued on time; TTFT 100 ms, except the
    first `slow` (TTFT `ttft_ms`); the last `failed` fail after their first token."""
    out = []
    for k in range(n):
        at = k * NS // 10
        first = at + (ttft_ms if k < slow else 100) * NS // 1000
        error = "boom" if k >= n - failed else None
        out.append(
            RequestRecord(f"r{k}", at, first + NS // 100, (first,), (1,), None, error, (), at)
        )
    return out


def _judge_ttft(records: list[RequestRecord], limit: float = 2000.0, pct: str = "p99"):
    res = summarize(records, INFO, scenario="server", workload="w", max_tokens=None, qps=10.0)
    return judge(res, {}, {f"ttft_{pct}_ms": limit})


def test_slo_pass_needs_loadgens_early_stopping_estimate() -> None:
    # 4 of 459 over: the observed p99 (the 455th value) is 100 ms, under the limit, but
    # LoadGen's estimate needs 1,157 requests to accept 4 overs: INVALID, not PASS
    v = _judge_ttft(_slow_firsts(459, 4))
    assert v.status == "INVALID"
    (reason,) = v.invalid
    assert reason == (
        "TTFT p99: 4 of 459 requests over 2,000 ms; LoadGen's early-stopping estimate needs "
        "at least 1,157 requests with 4 over (or fewer over) to accept p99 at 99% confidence "
        "(observed p99 100 ms, early-stopping estimate 2,500 ms)"
    )
    (check,) = [c for c in v.checks if c.metric == "ttft_p99_ms"]
    assert (check.status, check.count, check.over, check.needed) == ("INVALID", 459, 4, 1157)
    assert check.observed == pytest.approx(100.0) and check.estimate == pytest.approx(2500.0)
    # the same 4 overs in 1,157 requests: accepted, and the estimate is under the limit
    v = _judge_ttft(_slow_firsts(1157, 4))
    (check,) = [c for c in v.checks if c.metric == "ttft_p99_ms"]
    assert v.status == "PASS" and check.estimate == pytest.approx(100.0)
    assert _judge_ttft(_slow_firsts(459, 0)).status == "PASS"  # none over: 459 suffice
    # 5 of 459 over: the observed p99 itself misses the limit
    v = _judge_ttft(_slow_firsts(459, 5))
    assert v.status == "FAIL" and v.invalid == ()
    assert v.failed[0].observed == pytest.approx(2500.0)


def test_slo_at_p90_uses_its_own_counts() -> None:
    # p90: 44 requests with none over, 64 with one, 81 with two (LoadGen)
    assert _judge_ttft(_slow_firsts(44, 0), pct="p90").status == "PASS"
    assert _judge_ttft(_slow_firsts(63, 1), pct="p90").status == "INVALID"
    assert _judge_ttft(_slow_firsts(64, 1), pct="p90").status == "PASS"
    assert _judge_ttft(_slow_firsts(81, 2), pct="p90").status == "PASS"


def test_failed_requests_count_as_over_the_limit() -> None:
    records = _slow_firsts(1157, 3, failed=1)
    res = summarize(records, INFO, scenario="server", workload="w", max_tokens=None, qps=10.0)
    (check,) = slo_checks(res, {"ttft_p99_ms": 2000})
    assert (check.count, check.over, check.status) == (1157, 4, "PASS")
    one_fewer = res.records[:-2] + res.records[-1:]  # one on-time request less
    (check,) = slo_checks(dataclasses.replace(res, records=one_fewer), {"ttft_p99_ms": 2000})
    assert (check.count, check.over, check.status) == (1156, 4, "INVALID")
    assert judge(res, {}, {"ttft_p99_ms": 2000}).status == "FAIL"  # a failure fails the run


def test_schedule_lag_beyond_tolerance_is_invalid() -> None:
    lagging = dataclasses.replace(_server_result().lag, p99=0.2)
    (reason,) = validity(_server_result(lag=lagging), {})
    assert (
        "fell behind its seeded arrival schedule: p99 issue lag 200.0 ms > tolerance 100.0 ms"
        in reason
    )


def test_an_engine_that_cannot_keep_up_is_invalid_not_pass() -> None:
    res = _server_result(achieved_qps=0.5)
    (reason,) = validity(res, {})
    assert "did not sustain the offered load: it completed 0.50 requests/s < 90%" in reason
    assert judge(res, {}, {"ttft_p50_ms": 1e9}).status == "INVALID"


def test_a_saturated_client_is_invalid() -> None:
    (reason,) = validity(_server_result(client_cpu=0.97), {})
    assert reason.startswith("the client saturated: the driver thread used 97% of a core")


def test_failed_requests_fail_before_validity() -> None:
    res = _server_result(failed=1)
    assert judge(res, {}, {"ttft_p99_ms": 1}).status == "FAIL"


def _closed_loop(seconds: int, slow_from: float | None = None) -> list[RequestRecord]:
    """Two requests in flight, each 1 s with 10 tokens: 20 tokens/s; from `slow_from`
    seconds on, the engine runs at half speed (a burst of slowness, not noise)."""
    out = []
    for lane in range(2):
        at = lane * NS // 2
        k = 0
        while at < seconds * NS:
            slow = slow_from is not None and at >= slow_from * NS
            step = (2 if slow else 1) * NS // 10
            chunks = tuple(at + (i + 1) * step for i in range(10))
            out.append(RequestRecord(f"r{lane}-{k}", at, chunks[-1], chunks, (1,) * 10))
            at, k = chunks[-1], k + 1
    return out


def test_sequential_looks_at_doubling_times_and_stops_when_decisive() -> None:
    steady = _closed_loop(20)  # 20 tokens/s
    stop = Sequential(32.0, {"min_tokens_per_s": 10.0}, 1, 0.95)
    assert stop.looks == 5
    assert not stop(steady, 1.5)  # before the first look (2 s)
    assert not stop(_closed_loop(2), 2.0)  # too few batches yet: no interval, no decision
    assert stop(steady, 16.0)  # decisive PASS
    assert stop.decided_at == 16.0
    unclear = Sequential(32.0, {"min_tokens_per_s": 20.0}, 1, 0.95)
    assert not unclear(steady, 16.0)
    assert not unclear(steady, 17.0)  # the same look is not taken twice
    assert unclear.next == 4
    slow = Sequential(32.0, {"per_gpu": 100.0}, 1, 0.95)
    assert slow(steady, 16.0)  # decisive FAIL also stops


def test_batch_windows_leave_out_the_ramp_and_span_requests() -> None:
    batches = batch_rates(_closed_loop(20))
    # the mean latency is 1 s: the ramp ends 1 s after the first issue; windows of at
    # least 2 latencies and 5 completions (2 per second): 2.5 s, so 7 over 19.5 s
    assert batches.start_ns == NS
    assert len(batches.rates) == 7 and batches.merges == 0
    assert batches.width_ns == pytest.approx(19.5 * NS / 7, abs=1)
    assert batches.rates[:-1] == pytest.approx([20.0] * 6, rel=0.05)  # the last: the drain
    assert lag1([1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.25)
    assert lag1([1.0, 1.0, 1.0]) is None


def test_windows_correlated_at_the_last_count_give_no_interval_when_too_few_are_effective() -> None:
    # a slow second half: window rates 20, 20, 20, 10, 10, 10 ... are correlated at lag 1;
    # halving 11 windows would leave 5, so they are kept, with their lag-1 (0.78), whose
    # AR(1) variance leaves fewer than 3 effective windows: no interval
    shifted = _closed_loop(40, slow_from=20)
    batches = batch_rates(shifted)
    assert batches.merges == 0 and len(batches.rates) == 11
    assert batches.lag1 == pytest.approx(lag1(batches.rates)) and batches.lag1 > 0.7
    assert throughput_interval(shifted, 0.95) is None
    res = summarize(shifted, INFO, scenario="concurrency", workload="w", max_tokens=None)
    v = judge(res, {"min_tokens_per_s": 5.0})
    check, steady = v.failed
    assert check.status == "INCONCLUSIVE" and check.ci_low is None
    assert check.batches == len(batches.rates)
    # and the step itself is found: not steady, with too little tail to judge on
    assert v.status == "INVALID" and steady.metric == "steady_rate"
    assert steady.detail.startswith("the rate fell from 20 to 10 tokens/s at 20.9 s: not steady")
    assert correlated([20.0] * 5 + [10.0] * 5) and not correlated([20.0, 10.0] * 5)


def test_an_itl_limit_counts_token_gaps() -> None:
    # 50 requests of 2 chunks 10 ms apart, one with a 300 ms gap; failed requests: none
    recs = [
        RequestRecord(f"r{k}", k * NS, k * NS + NS // 2,
                      (k * NS + NS // 10, k * NS + NS // 10 + (300 if k == 0 else 10) * NS // 1000),
                      (1, 1), scheduled_ns=k * NS)
        for k in range(50)
    ]  # fmt: skip
    res = summarize(recs, INFO, scenario="server", workload="w", max_tokens=None, qps=1.0)
    (reason,) = validity(res, {"itl_p90_ms": 100})
    assert reason.startswith(
        "ITL p90: 1 of 50 token gaps over 100 ms; LoadGen's early-stopping estimate needs "
        "at least 64 token gaps with 1 over (or fewer over)"
    )
