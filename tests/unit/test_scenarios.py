"""Server, concurrency and the sim engine, driven for real on short, fast timelines.

Assertions are on what was recorded (schedules, counts, orders), never on how long
something took, so a slow or busy machine cannot fail them.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import AsyncIterator

import pytest

from pytest_tokperf.driver import NS, Plan, poisson_offsets_ns, run_plan
from pytest_tokperf.engines import Chunk, EngineError, EngineInfo, Request, load_engine
from pytest_tokperf.engines.sim import (
    Phases,
    SimEngine,
    mean_request_s,
    mean_speed,
    parse_settings,
    request_timeline,
)


class Counting:
    """Streams `max_tokens` chunks 1 ms apart; counts requests in flight; can fail or hang."""

    info = EngineInfo("counting", "m", "f16", 1)

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            for i in range(request.max_tokens):
                if request.prompt == "fail" and i == 1:
                    raise RuntimeError("engine fell over")
                await asyncio.sleep(3600 if request.prompt == "hang" else 0.001)
                yield Chunk(1, "x")
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        pass


def reqs(n: int, prompt: str = "ok", tokens: int = 3) -> list[Request]:
    return [Request(f"r{i}", prompt, tokens) for i in range(n)]


def test_poisson_schedule_is_seeded_and_at_the_rate() -> None:
    a = list(itertools.islice(poisson_offsets_ns(50.0, seed=7), 2000))
    b = list(itertools.islice(poisson_offsets_ns(50.0, seed=7), 2000))
    c = list(itertools.islice(poisson_offsets_ns(50.0, seed=8), 2000))
    assert a == b and a != c and a[0] == 0
    gaps = [(y - x) / NS for x, y in itertools.pairwise(a)]
    assert all(g >= 0 for g in gaps)
    # 1999 exponential gaps of mean 20 ms: the sample mean is within 10% (about 4 sigma)
    assert statistics.fmean(gaps) == pytest.approx(0.02, rel=0.1)
    # exponential: the standard deviation equals the mean
    assert statistics.stdev(gaps) == pytest.approx(statistics.fmean(gaps), rel=0.15)


def test_server_issues_on_its_seeded_schedule() -> None:
    plan = Plan("server", qps=200.0, seed=3)
    driven = run_plan(Counting(), reqs(20), plan)
    recs = driven.records
    assert [r.id for r in recs] == [f"r{i}" for i in range(20)]
    offsets = list(itertools.islice(poisson_offsets_ns(200.0, seed=3), 20))
    start = recs[0].scheduled_ns
    assert start is not None
    assert [r.scheduled_ns - start for r in recs] == offsets  # type: ignore[operator]
    for r in recs:
        assert r.ok and r.output_tokens == 3
        assert r.issue_ns >= r.scheduled_ns  # type: ignore[operator]
        assert r.issue_ns < r.chunk_ns[0] <= r.end_ns
    assert driven.stopped == "all requests issued" and driven.window_end_ns is None
    assert driven.client_cpu is not None and 0 <= driven.client_cpu <= 1.5


def test_concurrency_keeps_n_in_flight_and_no_more() -> None:
    engine = Counting()
    driven = run_plan(engine, reqs(30), Plan("concurrency", concurrency=4))
    assert engine.most == 4
    assert len(driven.records) == 30 and all(r.ok for r in driven.records)
    assert all(r.scheduled_ns is None for r in driven.records)
    # a closed loop: the fifth request starts only after one of the first four ended
    first_end = min(r.end_ns for r in driven.records[:4])
    assert driven.records[4].issue_ns >= first_end


def test_max_duration_bounds_an_endless_source() -> None:
    endless = (Request(f"r{i}", "ok", 2) for i in itertools.count())
    driven = run_plan(
        Counting(),
        endless,
        Plan("concurrency", concurrency=2, max_duration_s=0.2, look_every_s=0.01),
    )
    assert driven.stopped == "max_duration_s=0.2 reached"
    assert driven.window_end_ns is not None
    assert all(r.ok for r in driven.records)
    start = min(r.issue_ns for r in driven.records)
    assert 0 < driven.window_end_ns - start <= 0.2 * NS  # the window ends 0.2 s after t0
    assert all(r.issue_ns <= driven.window_end_ns for r in driven.records)


def test_stop_callback_ends_issuing_after_the_minimums() -> None:
    seen: list[int] = []

    def stop(snapshot, elapsed_s: float) -> bool:
        seen.append(sum(1 for r in snapshot if r.ok))
        return True

    endless = (Request(f"r{i}", "ok", 2) for i in itertools.count())
    plan = Plan("concurrency", concurrency=2, min_requests=6, max_duration_s=30, look_every_s=0.01)
    driven = run_plan(Counting(), endless, plan, stop=stop)
    assert driven.stopped.startswith("early stop after")
    assert len(seen) == 1  # asked once the minimums were met, then stopped
    done = sum(1 for r in driven.records if r.end_ns <= driven.window_end_ns)  # type: ignore[operator]
    assert done >= 6


def test_progress_sees_in_flight_requests() -> None:
    snapshots: list[tuple[int, int]] = []

    def progress(snapshot, elapsed_s: float) -> None:
        snapshots.append((len(snapshot), sum(r.output_tokens for r in snapshot)))

    plan = Plan("concurrency", concurrency=1, look_every_s=0.001)
    run_plan(Counting(), reqs(3, tokens=30), plan, progress=progress)
    assert snapshots and all(n >= 1 for n, _ in snapshots)
    # a snapshot taken mid-request counts the tokens streamed so far
    assert any(tokens % 30 for _, tokens in snapshots)


def test_failed_and_hanging_server_requests_are_records() -> None:
    requests = [Request("ok", "ok", 3), Request("bad", "fail", 3), Request("stuck", "hang", 3)]
    driven = run_plan(Counting(), requests, Plan("server", qps=100.0, timeout_s=0.5))
    ok, bad, stuck = driven.records
    assert ok.ok
    assert bad.error == "RuntimeError: engine fell over" and bad.output_tokens == 1
    assert stuck.error is not None and "time limit" in stuck.error


def test_a_closed_loop_run_stops_at_its_time_limit() -> None:
    # the limit (a timerfd-woken task, not a loop timer) cuts the stuck request, and the
    # worker that held it issues nothing after it: with max_duration_s beyond the limit,
    # only the limit's halt stops that worker
    requests = [Request("ok", "ok", 3), Request("stuck", "hang", 3), Request("next", "ok", 3)]
    start = time.monotonic()
    plan = Plan("concurrency", concurrency=1, timeout_s=0.5, max_duration_s=30)
    driven = run_plan(Counting(), requests, plan)
    took = time.monotonic() - start
    assert [r.id for r in driven.records] == ["ok", "stuck"]
    ok, stuck = driven.records
    assert ok.ok
    assert stuck.error is not None and "time limit" in stuck.error
    assert 0.5 <= took < 5


def test_sim_settings_are_checked() -> None:
    with pytest.raises(EngineError, match="unknown sim engine settings speed; allowed"):
        parse_settings({"speed": 1})
    with pytest.raises(EngineError, match="stall_prob: a probability is at most 1"):
        parse_settings({"stall_prob": 2})
    with pytest.raises(EngineError, match="slots: expected an integer"):
        parse_settings({"slots": 1.5})
    with pytest.raises(EngineError, match="tokens_per_s: out of range"):
        parse_settings({"tokens_per_s": 0})
    with pytest.raises(EngineError, match="jitter: expected a number"):
        parse_settings({"jitter": "high"})


def test_sim_timeline_is_seeded_and_has_the_set_mean() -> None:
    s = parse_settings({"tokens_per_s": 100.0, "ttft_s": 0.5, "jitter": 0.3, "seed": 1})
    req = Request("q", "p", 2000)
    a, fail_a = request_timeline(s, req)
    b, _ = request_timeline(s, req)
    c, _ = request_timeline({**s, "seed": 2.0}, req)
    assert a == b and a != c and not fail_a
    assert len(a) == 2000 and a == sorted(a)
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert statistics.fmean(gaps) == pytest.approx(0.01, rel=0.05)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(0.3, rel=0.15)
    assert mean_request_s(s, 2000) == pytest.approx(0.5 + 1999 * 0.01)
    stalls = parse_settings({"tokens_per_s": 100.0, "stall_prob": 0.1, "stall_s": 1.0})
    assert mean_request_s(stalls, 11) == pytest.approx(0.05 + 10 * 0.01 + 10 * 0.1)


def test_sim_engine_streams_fails_and_limits_slots() -> None:
    engine = load_engine("sim", {"time_scale": 1000.0, "slots": 2, "chunk_tokens": 3}, 4)
    assert isinstance(engine, SimEngine)
    assert engine.info.backend == "sim" and engine.info.devices == 4
    driven = run_plan(engine, reqs(6, tokens=7), Plan("offline"))
    for r in driven.records:
        assert r.ok and r.output_tokens == 7 and r.chunk_tokens == (3, 3, 1)
    # two slots: requests 3.. wait until a slot frees, so the third starts after the first ends
    ends = sorted(r.end_ns for r in driven.records)
    starts_of_third = sorted(r.chunk_ns[0] for r in driven.records)[2]
    assert starts_of_third >= ends[0]
    failing = load_engine("sim", {"time_scale": 1000.0, "fail_prob": 1.0}, 1)
    (bad,) = run_plan(failing, reqs(1, tokens=10), Plan("offline")).records
    assert bad.error == "SimError: simulated failure after 5 tokens" and bad.output_tokens == 5
    # a request longer than the context fails at once, as a real server rejects it
    short = load_engine("sim", {"time_scale": 1000.0, "max_model_len": 8}, 1)
    ok, long = run_plan(
        short, [*reqs(1, tokens=8), *reqs(1, tokens=10**400)], Plan("offline")
    ).records
    assert ok.ok and ok.output_tokens == 8
    assert long.error is not None and "more than max_model_len 8" in long.error
    assert long.output_tokens == 0


def test_sim_phases_slow_every_gap_and_are_seeded() -> None:
    with pytest.raises(EngineError, match="slow_factor < 1 needs phase_s > 0"):
        parse_settings({"slow_factor": 0.5})
    with pytest.raises(EngineError, match="slow_factor: a slow phase's speed is at most 1"):
        parse_settings({"slow_factor": 1.5, "phase_s": 1})
    phases = Phases(0.5, 3.0, seed=7)
    phases.work_at(10.0)
    # fast from the start: before the first boundary, work is time; then half speed
    end_fast = phases.starts[1]
    assert phases.after(0.0, end_fast / 2) == pytest.approx(end_fast / 2)
    assert phases.work_at(end_fast) == pytest.approx(end_fast)
    assert phases.after(end_fast, 0.1) == pytest.approx(end_fast + 0.2)
    # a gap that straddles the slow phase's end is slow only for its slow part
    end_slow = phases.starts[2]
    before = end_slow - 0.1
    assert phases.after(before, 0.25) == pytest.approx(end_slow + 0.2)
    again = Phases(0.5, 3.0, seed=7)
    again.work_at(10.0)
    assert again.starts[:3] == phases.starts[:3]
    # long run: fast and slow each half of the time, so the mean speed is (1 + 0.5) / 2
    assert phases.work_at(30_000.0) / 30_000.0 == pytest.approx(0.75, rel=0.03)
    assert mean_speed(parse_settings({"slow_factor": 0.6, "phase_s": 3})) == pytest.approx(0.8)
    off = Phases(1.0, 0.0, seed=7)
    assert off.after(5.0, 2.0) == 7.0
