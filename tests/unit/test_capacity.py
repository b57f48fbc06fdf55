"""Capacity search and the capacity_floor verdict on synthetic probes and records."""

from __future__ import annotations

import math

import pytest

from pytest_tokperf import capacity
from pytest_tokperf.capacity import Capacity, Probe, bracket, floor_check, judge_probe, search
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.markers import parse_capacity_marker
from pytest_tokperf.metrics import NS, RunResult, summarize
from pytest_tokperf.profiles import BUILTIN

INFO = EngineInfo("t", "m", "p", 1)
EMPTY = summarize([], INFO, scenario="server", workload="w", max_tokens=8, qps=1.0)
SLOS = {"ttft_p99_ms": 2000.0}


def _probe(qps: float, status: str, seconds: float = 1.0) -> Probe:
    return Probe(qps, status, "" if status == "PASS" else "why", (), EMPTY, seconds)


class Threshold:
    """An engine whose probes pass exactly up to `capacity` requests/s; a clock that
    advances by each probe's seconds."""

    def __init__(self, cap: float, seconds: float = 10.0, invalid_above: float = math.inf):
        self.cap, self.seconds, self.invalid_above = cap, seconds, invalid_above
        self.now = 0.0
        self.rates: list[float] = []

    def __call__(self, rate: float) -> Probe:
        self.rates.append(rate)
        self.now += self.seconds
        if rate > self.invalid_above:
            return _probe(rate, "INVALID", self.seconds)
        return _probe(rate, "PASS" if rate <= self.cap else "FAIL", self.seconds)

    def clock(self) -> float:
        return self.now


@pytest.mark.parametrize(("cap", "saturation"), [(97.0, 120.0), (30.0, 120.0), (150.0, 120.0)])
def test_bisection_brackets_the_capacity_within_tolerance(cap: float, saturation: float) -> None:
    engine = Threshold(cap)
    probes, stopped = search(engine, saturation, budget_s=1e9, tolerance=0.05, clock=engine.clock)
    low, high = bracket(probes)
    assert stopped == "converged"
    assert low is not None and high is not None
    assert low <= cap < high and (high - low) <= 0.05 * low
    # bisection: about log2(range / (tolerance * cap)) probes, not a grid
    assert len(probes) <= 12


def test_the_floor_is_probed_first_even_with_no_budget() -> None:
    engine = Threshold(100.0)
    probes, stopped = search(
        engine, 120.0, floors=(60.0,), budget_s=0.0, tolerance=0.05, clock=engine.clock
    )
    assert [p.qps for p in probes] == [60.0] and stopped == "budget"


def test_the_budget_stops_the_search_before_a_probe_would_overrun_it() -> None:
    engine = Threshold(97.0, seconds=10.0)
    probes, stopped = search(engine, 120.0, budget_s=35.0, tolerance=0.001, clock=engine.clock)
    # after 3 probes (30 s spent), a 4th of 10 s would end at 40 s > 35 s
    assert len(probes) == 3 and stopped == "budget" and engine.now == 30.0


def test_a_rate_the_client_could_not_issue_is_never_capacity() -> None:
    engine = Threshold(200.0, invalid_above=90.0)  # the engine could, the client cannot
    probes, _ = search(engine, 120.0, budget_s=1e9, tolerance=0.05, clock=engine.clock)
    low, high = bracket(probes)
    assert low is not None and low <= 90.0 and high is not None
    assert all(p.status != "PASS" for p in probes if p.qps > 90.0)


def test_bracket_ignores_a_pass_above_a_proven_fail() -> None:
    probes = [_probe(50, "PASS"), _probe(80, "FAIL"), _probe(100, "PASS"), _probe(70, "PASS")]
    assert bracket(probes) == (70, 80)
    assert bracket([_probe(80, "INCONCLUSIVE")]) == (None, 80)
    assert bracket([]) == (None, None)


def _found(*probes: Probe) -> Capacity:
    return Capacity("server", SLOS, 120.0, tuple(probes), (60.0,), 0.05, 60.0, 30.0, "budget")


@pytest.mark.parametrize(
    ("probes", "status"),
    [
        ([_probe(60, "PASS")], "PASS"),
        ([_probe(60, "INCONCLUSIVE"), _probe(90, "PASS")], "PASS"),  # above the floor
        ([_probe(60, "FAIL"), _probe(90, "PASS")], "FAIL"),  # the floor's own miss wins
        ([_probe(60, "INCONCLUSIVE"), _probe(50, "PASS")], "INCONCLUSIVE"),  # below: no
        ([_probe(60, "INVALID"), _probe(30, "PASS")], "INVALID"),
        ([_probe(90, "PASS")], "INCONCLUSIVE"),  # no probe at the floor itself
    ],
)
def test_floor_check(probes: list[Probe], status: str) -> None:
    check = floor_check(_found(*probes), 60.0)
    assert check.status == status and check.kind == "capacity" and check.limit == 60.0
    assert "capacity " in check.detail


# --- judging a probe from its records ----------------------------------------------


def _records(ttfts: list[float], gap_s: float, lag_s: float = 0.0) -> list[RequestRecord]:
    """Requests arriving every `gap_s`, each with its TTFT, then 8 tokens 1 ms apart."""
    out = []
    for i, ttft in enumerate(ttfts):
        at = round(i * gap_s * NS)
        issue = at + round(lag_s * NS)
        first = at + round(ttft * NS)
        chunks = tuple(first + k * 1_000_000 for k in range(8))
        out.append(RequestRecord(f"r{i}", issue, chunks[-1], chunks, (1,) * 8, scheduled_ns=at))
    return out


def _run(records: list[RequestRecord], qps: float) -> RunResult:
    return summarize(records, INFO, scenario="server", workload="w", max_tokens=8, qps=qps)


def test_probe_statuses_follow_the_observed_percentile_and_the_estimate() -> None:
    n = 600  # 600 > LoadGen's 459 for p99 at 99% with none over
    assert capacity.probe_samples(SLOS) == math.ceil(459 * 1.2)
    fast = _run(_records([0.01] * n, 0.01), 100.0)
    assert judge_probe(fast, SLOS, 6.0).status == "PASS"
    # 2% of requests at 3 s: the 99th percentile itself is over 2 s: FAIL
    slow = [3.0 if i % 50 == 0 else 0.01 for i in range(n)]
    probe = judge_probe(_run(_records(slow, 0.01), 100.0), SLOS, 6.0)
    assert probe.status == "FAIL" and "TTFT p99 3,000 ms > limit 2,000 ms" in probe.why
    # 100 requests none over: fewer than 459, so the estimate cannot accept p99
    few = judge_probe(_run(_records([0.01] * 100, 0.01), 100.0), SLOS, 1.0)
    assert few.status == "INCONCLUSIVE" and "459" in few.why


def test_a_probe_the_client_issued_late_is_invalid_whatever_its_latencies() -> None:
    late = _run(_records([0.05] * 600, 0.01, lag_s=0.03), 100.0)  # 30 ms behind > 10 ms
    probe = judge_probe(late, SLOS, 6.0)
    assert probe.status == "INVALID" and "fell behind its seeded arrival schedule" in probe.why


def test_a_probe_whose_latency_climbs_toward_the_limit_is_not_a_pass() -> None:
    # TTFT rising from 10 ms to 1.5 s over the run: under the limit, but a growing queue
    climbing = [0.01 + 1.5 * i / 600 for i in range(600)]
    probe = judge_probe(_run(_records(climbing, 0.01), 100.0), SLOS, 6.0)
    assert probe.status == "INCONCLUSIVE" and "a growing queue" in probe.why
    # by hand: thirds' medians at requests 100 and 500: 0.01 + 1.5 * 100 / 600 = 0.26 s
    # and 0.01 + 1.5 * 500 / 600 = 1.26 s, 1 s apart; observed p99 (request 594) 1.495 s;
    # continued for 4 more runs' length at 1 s per 2/3 run: 1,495 + 1,000 * 1.5 * 4 ms
    assert "ends near p99 7,495 ms" in probe.why


def test_a_small_drift_of_a_stable_queue_is_no_reason() -> None:
    # 10 ms in the first half, 20 ms after: a clear change, but far from 2,000 ms even
    # continued (20 + 10 * 1.5 * 4 = 80 ms)
    drift = [0.01 if i < 300 else 0.02 for i in range(600)]
    assert judge_probe(_run(_records(drift, 0.01), 100.0), SLOS, 6.0).status == "PASS"


def test_capacity_marker_usage_errors() -> None:
    where = "test_x.py::test_cap"
    ok = parse_capacity_marker((), {"min_qps": {"sim": 60}, "ttft_p99_ms": 2000}, where, BUILTIN)
    assert ok == {"min_qps": {"sim": 60.0}, "ttft_p99_ms": 2000.0}
    closed = {"min_concurrency": {"sim": 4}, "tpot_p90_ms": 50}
    assert parse_capacity_marker((), closed, where, BUILTIN)["min_concurrency"] == {"sim": 4.0}
    for kwargs, says in (
        ({"ttft_p99_ms": 2000}, "needs one of min_qps"),
        ({"min_qps": 60}, "at least one latency SLO"),
        ({"min_qps": -1, "ttft_p99_ms": 1}, "must be a positive number"),
        ({"min_qps": 60, "ttft_p98_ms": 1}, "unknown keywords ttft_p98_ms"),
        ({"min_qps": 60, "min_concurrency": 4, "ttft_p99_ms": 1}, "needs one of min_qps"),
        ({"min_concurrency": 2.5, "ttft_p99_ms": 1}, "give a whole number"),
        ({"min_concurrency": {"sim": 0}, "ttft_p99_ms": 1}, "must be a positive number"),
    ):
        with pytest.raises(pytest.UsageError, match=says):
            parse_capacity_marker((), kwargs, where, BUILTIN)


@pytest.mark.parametrize("cap", [1, 3, 4, 7, 12])
def test_a_concurrency_search_ends_on_adjacent_integers_around_the_capacity(cap: int) -> None:
    engine = Threshold(cap)
    probes, stopped = search(
        engine, 999.0, floors=(2,), budget_s=1e9, tolerance=0.05, clock=engine.clock, integer=True
    )
    low, high = bracket(probes)
    assert stopped == "converged" and (low, high) == (cap, cap + 1)
    assert engine.rates[0] == 2 and all(r == int(r) >= 1 for r in engine.rates)
    assert len(set(engine.rates)) == len(engine.rates)  # no load probed twice


def test_a_concurrency_search_that_fails_at_one_says_so() -> None:
    engine = Threshold(0.5)
    probes, stopped = search(engine, 999.0, budget_s=1e9, tolerance=0.05, clock=engine.clock,
                             integer=True)  # fmt: skip
    assert stopped == "no passing rate" and [p.level for p in probes] == [1]


def test_closed_loop_rate_is_a_lower_bound_on_a_serial_and_a_batching_engine() -> None:
    """Two engines whose closed-loop rate is known in closed form: one that serves a
    request at a time (rate 1/s whatever the concurrency) and one with 4 slots of 1 s
    each (rate min(c, 4)/s). Every bound from a measured neighbour is at most the truth
    and the tightest bound is exact for a neighbour on the same side of saturation."""
    for truth in (lambda c: 1.0, lambda c: float(min(c, 4))):
        for c in range(1, 10):
            for at in range(1, 10):
                bound = capacity.closed_loop_rate(c, {at: truth(at)}, saturation=99.0)
                assert bound <= truth(c) + 1e-12
        assert capacity.closed_loop_rate(2, {}, saturation=7.0) == 7.0
    assert capacity.closed_loop_rate(2, {8: 4.0, 1: 1.0}, saturation=9.0) == 1.0
    assert capacity.closed_loop_rate(6, {3: 3.0, 8: 4.0}, saturation=9.0) == 3.0


def test_a_concurrency_floor_check_names_requests_in_flight() -> None:
    at_two = Probe(2.0, "PASS", "", (), EMPTY, 1.0, "concurrency")
    at_four = Probe(4.0, "FAIL", "TTFT p90 900 ms > limit 500 ms", (), EMPTY, 1.0, "concurrency")
    found = Capacity("concurrency", SLOS, 5.0, (at_two, at_four), (2.0,), 0.05, 30.0, 2.0,
                     "converged", axis="concurrency")  # fmt: skip
    assert found.max_concurrency == 2 and found.max_qps is None and found.first_fail == 4.0
    check = floor_check(found, 2.0)
    assert check.metric == "min_concurrency" and check.status == "PASS"
    assert "capacity floor 2 requests in flight met" in check.detail
    assert floor_check(found, 4.0).status == "FAIL"
    doc = found.to_json()
    assert doc["axis"] == "concurrency" and doc["max_concurrency"] == 2
    assert [p["concurrency"] for p in doc["probes"]] == [2, 4]
    assert [p["qps"] for p in doc["probes"]] == [None, None]
