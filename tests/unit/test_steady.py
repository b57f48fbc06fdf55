"""Steadiness, the run's minimum, and early stopping that waits for every check."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from pytest_tokperf import machine, metrics, steady, verdict
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.engines.sim import Phases
from pytest_tokperf.sequential import Sequential

NS = 1_000_000_000
INFO = EngineInfo("sim", "sim", "none", 1)


def _loop(seconds: float, rate_at, lanes: int = 4, seed: int = 0) -> list[RequestRecord]:
    """A closed loop of `lanes` lanes of 1 s requests of 10 one-token chunks, each
    token `1 / rate_at(t)` of a second apart: the engine's speed at time t."""
    rng = random.Random(seed)
    out = []
    for lane in range(lanes):
        at, k = 0.0, 0
        while at < seconds:
            chunks = []
            t = at
            for _ in range(10):
                t += rng.uniform(0.8, 1.2) / (10 * rate_at(t))
                chunks.append(round(t * NS))
            out.append(RequestRecord(f"{lane}-{k}", round(at * NS), chunks[-1], tuple(chunks),
                                     (1,) * 10))  # fmt: skip
            at, k = t, k + 1
    return out


def test_a_steady_rate_has_no_change_and_a_step_is_found_where_it_is() -> None:
    assert steady.rate_change(_loop(120, lambda t: 1.0), None, "concurrency") is None
    step = _loop(120, lambda t: 1.0 if t < 50 else 0.6)
    change = steady.rate_change(step, None, "concurrency")
    assert change is not None and change.fell
    assert 40 <= change.at_s <= 62  # the windows are 1/10 of the run wide
    assert change.after / change.before == pytest.approx(0.6, abs=0.08)


def test_the_change_point_test_rarely_fires_on_noise() -> None:
    rng = random.Random(1)
    alarms = sum(
        steady.change_point([rng.gauss(100, 10) for _ in range(10)]) is not None
        for _ in range(4000)
    )
    # Bonferroni at 1% over the splits: 0.8% over 20,000 such series; two windows a side
    # (not three) made it 2%
    assert alarms / 4000 < 0.015
    assert steady.change_point([100.0] * 5 + [80.0] * 5) is not None
    assert steady.change_point([100.0] * 5 + [95.0] * 5) is None  # within the 10% tolerance
    assert steady.change_point([100.0, 80.0] * 2) is None  # too few windows to say


def test_a_throttled_run_is_judged_on_its_slow_tail_never_on_its_fresh_start() -> None:
    recs = _loop(300, lambda t: 1.0 if t < 100 else 0.6)
    res = metrics.summarize(recs, INFO, scenario="concurrency", workload="w", max_tokens=None)
    fresh = 4 * 10.0  # tokens/s before the throttle
    assert res.tokens_per_s > 0.7 * fresh  # the whole run's average would pass 0.7
    v = verdict.judge(res, {"min_tokens_per_s": 0.7 * fresh})
    (floor,) = [c for c in v.checks if c.kind == "floor"]
    assert v.status == "FAIL" and floor.observed == pytest.approx(0.6 * fresh, rel=0.08)
    assert floor.detail.startswith("judged on the tail after ")


def test_the_tail_after_a_change_is_cut_as_finely_as_the_runs_own_batches() -> None:
    # 60 s at 0.85 then 1.0 speed (a warm-up ending at 30 s): the change test's 10 windows
    # leave about 5 after the change, but the floor's batches are 2 s (two 1 s latencies),
    # so the tail has about 15 and an easy floor is decided on it, not "run longer"
    recs = _loop(60, lambda t: 0.85 if t < 30 else 1.0)
    change = steady.rate_change(recs, None, "concurrency")
    assert change is not None and not change.fell
    batch = metrics.batch_rates(recs, merge=False)
    assert change.batch_ns == batch.width_ns and change.width_ns > 2 * change.batch_ns
    tail = steady.tail_batches(recs, change)
    end = max(r.end_ns for r in recs)
    assert len(tail.rates) == (end - change.at_ns) // batch.width_ns >= 12
    first = sum(  # the first tail window's tokens, counted from the records by hand
        n
        for r in recs
        for at, n in zip(r.chunk_ns, r.chunk_tokens, strict=True)
        if change.at_ns <= at < change.at_ns + tail.width_ns
    )
    assert tail.rates[0] == pytest.approx(first * NS / tail.width_ns, rel=0.02)
    res = metrics.summarize(recs, INFO, scenario="concurrency", workload="w", max_tokens=None)
    v = verdict.judge(res, {"min_tokens_per_s": 10.0})
    (floor,) = [c for c in v.checks if c.kind == "floor"]
    assert v.status == "PASS" and floor.detail.startswith("judged on the tail after ")
    assert floor.batches == len(tail.rates)


def test_a_latency_that_grows_through_the_run_is_not_steady() -> None:
    recs = [
        RequestRecord(f"r{i}", i * NS, i * NS + NS, (i * NS + (10 + i) * NS // 1000,), (1,))
        for i in range(60)
    ]  # TTFT grows from 10 to 69 ms: a queue that never drains
    change = steady.latency_change(recs, metrics.ttft_s)
    assert change is not None and not change.fell and change.after > 2 * change.before
    flat = [
        RequestRecord(f"r{i}", i * NS, i * NS + NS, (i * NS + (30 + i % 7) * NS // 1000,), (1,))
        for i in range(60)
    ]
    assert steady.latency_change(flat, metrics.ttft_s) is None


def test_a_judged_run_shorter_than_its_minimum_cannot_pass() -> None:
    recs = _loop(20, lambda t: 1.0)
    res = metrics.summarize(recs, INFO, scenario="concurrency", workload="w", max_tokens=None)
    import dataclasses

    short = dataclasses.replace(res, min_duration_s=600.0)
    v = verdict.judge(short, {"min_tokens_per_s": 1.0})
    assert v.status == "INCONCLUSIVE"
    (why,) = [c for c in v.checks if c.metric == "min_duration_s"]
    assert why.detail.startswith("the run lasted 2") and "shorter than the 600 s" in why.detail
    assert verdict.judge(dataclasses.replace(res, min_duration_s=10.0), {"min_tokens_per_s": 1e6})\
        .status == "FAIL"  # a decisive miss stays one  # fmt: skip
    assert verdict.judge(short, {}).status == "MEASURED"  # nothing judged: no minimum


def test_early_stopping_waits_for_the_minimum_the_slos_and_the_baseline() -> None:
    recs = _loop(64, lambda t: 1.0)
    at = [r for r in recs if r.issue_ns < 16 * NS]
    floors = {"min_tokens_per_s": 1.0}
    assert Sequential(64.0, floors, 1, 0.95)(at, 16.0)  # an easy floor alone: decided
    held = Sequential(64.0, floors, 1, 0.95, min_duration_s=20.0)
    assert not held(at, 16.0) and not held(recs, 31.0)  # the looks at 4, 8, 16 s: not taken
    assert held.looks == 2 and held.per_look == pytest.approx(0.975)  # at 32 s and the end
    assert held(recs, 32.0)
    # a p50 TTFT SLO of 10 s is met by every request, but at 5 looks LoadGen's rule needs
    # more requests than the 99% of one look
    many = Sequential(64.0, floors, 1, 0.95, slos={"ttft_p50_ms": 10_000})
    assert many(at, 16.0)
    few = [r for r in at if r.issue_ns < 2 * NS]
    assert not Sequential(64.0, floors, 1, 0.95, slos={"ttft_p50_ms": 10_000})(few, 16.0)
    # a baseline of the same engine: decided only once the ratio's interval is within 5%
    stored = {
        "windows_per_s": metrics.window_rates(recs, metrics.BATCHES),
        "tokens_per_s": metrics.output_tokens_per_s(recs),
    }
    tight = Sequential(64.0, floors, 1, 0.95, baseline=(stored, {"tokens_per_s": 0.0001}))
    assert not tight(at, 16.0)  # no interval lies within 0.01%
    loose = Sequential(64.0, floors, 1, 0.95, baseline=(stored, {"tokens_per_s": 0.5}))
    assert loose(at, 16.0)


def test_the_sim_engine_throttles_and_warms_up_for_good() -> None:
    hot = Phases(1.0, 0.0, 0, throttle_after_s=20.0, throttle_factor=0.6)
    assert hot.after(0, 10) == 10  # fresh
    assert hot.after(15, 10) == pytest.approx(20 + 5 / 0.6)  # 5 s fresh, 5 s of work slow
    assert hot.work_at(30) == pytest.approx(20 + 10 * 0.6)
    warm = Phases(1.0, 0.0, 0, throttle_after_s=5.0, throttle_factor=2.0)
    assert warm.after(0, 9) == pytest.approx(5 + 4 / 2)


def test_other_processes_on_the_machine_are_measured_and_ours_are_not() -> None:
    start = machine.read()
    assert start is not None and os.getpid() in start.tree_pids
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])  # ours: in this process's tree
    t0 = time.perf_counter()
    child.wait()
    end = machine.read()
    assert end is not None
    ours_only = (end.tree_ticks - start.tree_ticks) / os.sysconf("SC_CLK_TCK")
    assert ours_only >= 1.0  # the child's 1.5 s, reaped into this process's cutime
    others, _ = machine.others(start, end, time.perf_counter() - t0)
    busy_total = (end.busy_ticks - start.busy_ticks) / os.sysconf("SC_CLK_TCK")
    assert others <= busy_total / (time.perf_counter() - t0) - 0.5  # the child is not other
    assert machine.busy(1.0, 0.0, 2) and not machine.busy(0.3, 0.1, 2)
    assert not machine.busy(3.0, 0.0, 16) and machine.busy(4.5, 0.0, 16)
