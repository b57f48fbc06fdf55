"""The goodput floor on synthetic records: goodput computed by hand, and its verdict."""

from __future__ import annotations

import random

import pytest

from pytest_tokperf import goodput, markers
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.metrics import NS, summarize
from pytest_tokperf.profiles import BUILTIN

INFO = EngineInfo("t", "m", "p", 1)
MS = 1_000_000


def _rec(id: str, issue_ms: int, first_ms: int, gap_ms: int, tokens: int, error=None):
    chunks = tuple((issue_ms + first_ms + i * gap_ms) * MS for i in range(tokens))
    return RequestRecord(id, issue_ms * MS, chunks[-1], chunks, (1,) * tokens, error=error)


def test_goodput_counts_only_requests_that_met_every_slo_by_hand() -> None:
    records = [
        _rec("a", 0, 100, 20, 11),  # TTFT 100 ms, TPOT 20 ms: meets both; ends at 300 ms
        _rec("b", 100, 600, 20, 11),  # TTFT 600 ms > 500: missed; ends at 900 ms
        _rec("c", 200, 100, 60, 6),  # TPOT 60 ms > 50: missed; ends at 600 ms
        _rec("d", 300, 50, 40, 21),  # meets both; ends at 350 + 800 = 1,150 ms
        _rec("e", 400, 50, 10, 5, error="boom"),  # failed: never goodput
    ]
    result = summarize(records, INFO, scenario="server", workload="w", max_tokens=32, qps=5.0)
    slos = {"ttft_p99_ms": 500.0, "tpot_p90_ms": 50.0}
    # good tokens 11 + 21 = 32 over first issue (0) .. last end (1.15 s)
    expected = 32 / 1.15
    assert result.goodput_tokens({"ttft": 0.5, "tpot": 0.05}) == pytest.approx(expected)
    good = goodput.good_only(records, {"ttft": 0.5, "tpot": 0.05})
    assert [r.ok for r in good] == [True, False, False, True, False]
    assert good[4].error == "boom" and good[1].error == goodput.MISSED
    # no interval from 5 requests: the floor cannot be decided, whatever its value
    check = goodput.floor_check(result, 10.0, slos, 0.95)
    assert check.status == "INCONCLUSIVE" and check.kind == "goodput"
    assert check.observed == pytest.approx(expected) and "2 of 5 requests" in check.detail


def _steady(rate: float, seconds: float, seed: int, late_share: float) -> list[RequestRecord]:
    """Poisson arrivals, 10 tokens each 10 ms apart after a 50 ms TTFT; `late_share` of
    the requests (chosen at random) start 1 s late: they miss a 500 ms TTFT limit."""
    rng = random.Random(seed)
    out, at = [], 0.0
    while at < seconds:
        first = 1050 if rng.random() < late_share else 50
        out.append(_rec(f"r{len(out)}", round(at * 1000), first, 10, 10))
        at += rng.expovariate(rate)
    return out


@pytest.mark.parametrize(("floor", "status"), [(100.0, "PASS"), (300.0, "FAIL")])
def test_goodput_floor_is_judged_on_its_interval(floor: float, status: str) -> None:
    # 20 requests/s x 10 tokens, a quarter late: goodput about 150 tokens/s, throughput 200
    records = _steady(20.0, 60.0, seed=1, late_share=0.25)
    result = summarize(records, INFO, scenario="server", workload="w", max_tokens=10, qps=20.0)
    slos = {"ttft_p99_ms": 500.0}
    good = sum(r.output_tokens for r in records if r.chunk_ns[0] - r.issue_ns <= 0.5 * NS)
    span = (max(r.end_ns for r in records) - min(r.issue_ns for r in records)) / NS
    check = goodput.floor_check(result, floor, slos, 0.95)
    assert check.observed == pytest.approx(good / span)
    assert 130 < check.observed < 170 and result.tokens_per_s > 180
    assert check.ci_low is not None and check.ci_high is not None
    assert check.ci_low < check.observed < check.ci_high
    assert check.status == status, check.detail


def test_goodput_floor_between_goodput_and_throughput_fails() -> None:
    # throughput clears 170 tokens/s, goodput does not: the floor must see the difference
    records = _steady(20.0, 60.0, seed=2, late_share=0.25)
    result = summarize(records, INFO, scenario="server", workload="w", max_tokens=10, qps=20.0)
    check = goodput.floor_check(result, 185.0, {"ttft_p99_ms": 500.0}, 0.95)
    assert result.tokens_per_s > 185 and check.status == "FAIL", check.detail


def test_goodput_floor_without_slos_is_invalid() -> None:
    result = summarize(_steady(20, 5, 0, 0), INFO, scenario="server", workload="w",
                       max_tokens=10, qps=20.0)  # fmt: skip
    check = goodput.floor_check(result, 10.0, {}, 0.95)
    assert check.status == "INVALID" and "latency_slo" in check.detail


def _spec(marks: dict[str, list]) -> markers.Spec:
    profile = BUILTIN["sim"]
    return markers.read(marks, profile, list(BUILTIN), None, markers.ParitySpec())


def test_goodput_floor_needs_a_latency_slo_marker() -> None:
    floor = pytest.mark.throughput_floor(min_goodput_tokens_per_s=50).mark
    slo = pytest.mark.latency_slo(ttft_p99_ms=500).mark
    with pytest.raises(pytest.UsageError, match="add a latency_slo"):
        _spec({"throughput_floor": [("t.py::x", floor)]})
    spec = _spec({"throughput_floor": [("t.py::x", floor)], "latency_slo": [("t.py::x", slo)]})
    assert spec.goodput_floor == 50 and spec.floors == {} and spec.gated
    bad = pytest.mark.throughput_floor(min_goodput_tokens_per_s=-1).mark
    with pytest.raises(pytest.UsageError, match="min_goodput_tokens_per_s"):
        _spec({"throughput_floor": [("t.py::x", bad)], "latency_slo": [("t.py::x", slo)]})
