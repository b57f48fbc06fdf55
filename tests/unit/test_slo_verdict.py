"""latency_slo parsing, validity (INVALID) and interval verdicts (PASS/FAIL/INCONCLUSIVE)."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.metrics import NS, Interval, summarize
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.verdict import (
    SLO_KEYWORDS,
    Sequential,
    floor_status,
    floors_for,
    judge,
    parse_slo_marker,
    per_look,
    per_request_limits,
    samples_needed,
    slo_parts,
    validity,
)

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
    # shared FACTS.md: Server p99 TTFT 2 s / TPOT 200 ms; Interactive 450 / 40 ms
    for name in ("h100-sxm", "gb200-nvl72", "gb300-nvl72"):
        assert BUILTIN[name].slos["server"] == {"ttft_p99_ms": 2000.0, "tpot_p99_ms": 200.0}
        assert BUILTIN[name].slos["interactive"] == {"ttft_p99_ms": 450.0, "tpot_p99_ms": 40.0}
    for key in BUILTIN["cpu"].slos["interactive"]:
        slo_parts(key)  # every default is a valid keyword


def test_samples_needed_is_loadgens_early_stopping_with_no_overs() -> None:
    assert samples_needed(0.99) == 459  # shared FACTS.md
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
    assert floor_status(None, 5.0, 5.0) == "PASS"
    assert floor_status(None, 4.9, 5.0) == "FAIL"
    assert per_look(0.95, 5) == pytest.approx(0.99)
    assert per_look(0.95, 1) == pytest.approx(0.95)


def _noisy(rates: list[int]) -> list[RequestRecord]:
    """One request whose tokens arrive `rates[i]` per 0.1 s window, mid-window."""
    chunks: list[int] = []
    for i, n in enumerate(rates):
        chunks += [i * NS // 10 + (2 * k + 1) * NS // (20 * n) for k in range(n)]
    return [RequestRecord("r", 0, len(rates) * NS // 10, tuple(chunks), (1,) * len(chunks))]


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
        "50 TTFT samples are too few for a p99: at least 459 are needed "
        "(LoadGen early stopping, none over the limit)"
    )
    v = judge(res, {}, {"ttft_p99_ms": 2000})
    assert v.status == "INVALID" and v.invalid == (reason,)


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


def test_sequential_looks_at_doubling_times_and_stops_when_decisive() -> None:
    fast = _noisy([10] * 10)  # a steady 100 tokens/s over 1 s
    stop = Sequential(16.0, {"min_tokens_per_s": 50.0}, 1, 0.95)
    assert stop.looks == 5
    assert not stop(fast, 0.5)  # before the first look (1 s)
    assert stop(fast, 1.0)  # decisive PASS
    assert stop.decided_at == 1.0
    unclear = Sequential(16.0, {"min_tokens_per_s": 100.0}, 1, 0.95)
    noisy = _noisy([8, 12] * 5)
    assert not unclear(noisy, 1.0)
    assert not unclear(noisy, 1.5)  # the same look is not taken twice
    assert not unclear(noisy, 8.0)  # looks at 2, 4 and 8 s all skipped to one
    assert unclear.next == 4
    slow = Sequential(16.0, {"per_gpu": 1000.0}, 1, 0.95)
    assert slow(fast, 1.0)  # decisive FAIL also stops
