"""Regression statistics (pure): ratio intervals, their coverage, the verdict rule."""

from __future__ import annotations

import math
import random

import pytest

from pytest_tokperf import regression
from pytest_tokperf.regression import (
    Ratio,
    latency_ratio,
    percentile_interval,
    status,
    throughput_ratio,
)


def test_throughput_ratio_is_the_ratio_of_mean_rates() -> None:
    cur = [150.0, 148.0, 152.0, 149.0, 151.0]
    base = [200.0, 198.0, 202.0, 201.0, 199.0]
    r = throughput_ratio(cur, base, 0.95)
    assert r is not None and r.low is not None and r.high is not None
    assert r.estimate == pytest.approx(150 / 200)
    assert r.low < 0.75 < r.high
    assert r.high - r.low < 0.03
    assert throughput_ratio([1.0], base, 0.95) is None  # one window: no interval
    assert throughput_ratio([5.0, 5.0], [4.0, 4.0], 0.95) == Ratio(1.25, 1.25, 1.25, 0.95)


def test_paired_windows_cancel_the_structure_both_runs_share() -> None:
    """Ramp-up and dips at the same places in both runs: the paired interval is narrow,
    the unpaired one carries the structure as if it were noise."""
    shape = [0.5, 1.0, 1.2, 0.7, 1.1, 1.0, 0.6, 1.2, 1.0, 0.8]
    rng = random.Random(5)
    base = [100 * s * rng.gauss(1, 0.01) for s in shape]
    cur = [80 * s * rng.gauss(1, 0.01) for s in shape]
    paired = throughput_ratio(cur, base, 0.95)
    unpaired = regression.welch_ratio(cur, base, 0.95)
    assert paired is not None and paired.low is not None and paired.high is not None
    assert unpaired is not None and unpaired.low is not None and unpaired.high is not None
    assert paired.low < 0.8 < paired.high and paired.high - paired.low < 0.03
    assert unpaired.high - unpaired.low > 0.2
    assert throughput_ratio([*cur[:9], 0.0], base, 0.95) == regression.welch_ratio(
        [*cur[:9], 0.0], base, 0.95
    )  # an empty window cannot be paired


@pytest.mark.parametrize("k", [5, 10, 30])
def test_throughput_interval_covers_the_true_ratio(k: int) -> None:
    """Unequal noise in the two runs (Welch): coverage close to the confidence."""
    rng = random.Random(k)
    reps, hits = 2000, 0
    for _ in range(reps):
        cur = [rng.gauss(90, 9) for _ in range(k)]
        base = [rng.gauss(100, 3) for _ in range(k)]
        for r in (throughput_ratio(cur, base, 0.95), regression.welch_ratio(cur, base, 0.95)):
            assert r is not None and r.low is not None and r.high is not None
            hits += r.low <= 0.9 <= r.high
    assert 0.93 <= hits / reps / 2 <= 0.97


def test_percentile_interval_has_no_interval_for_a_p99_of_few_samples() -> None:
    assert percentile_interval([float(i) for i in range(50)], 0.99, 0.95) is None
    low_high = percentile_interval([float(i) for i in range(1000)], 0.5, 0.95)
    assert low_high is not None and low_high[0] < 500 < low_high[1]


def test_latency_ratio_covers_the_true_ratio() -> None:
    """Exponential latencies, the current run 20% slower: p90 ratio 1.2 is covered."""
    rng = random.Random(7)
    reps, hits = 400, 0
    for _ in range(reps):
        cur = [rng.expovariate(1 / 1.2) for _ in range(400)]
        base = [rng.expovariate(1.0) for _ in range(400)]
        r = latency_ratio(cur, base, 0.9, 0.95)
        assert r is not None and r.low is not None and r.high is not None
        hits += r.low <= 1.2 <= r.high
    assert hits / reps >= 0.95  # Bonferroni-combined: at least the confidence


@pytest.mark.parametrize(
    ("low", "high", "higher", "expected"),
    [
        (0.70, 0.80, True, "FAIL"),
        (0.96, 1.04, True, "PASS"),
        (0.93, 1.01, True, "INCONCLUSIVE"),
        (1.10, 1.20, True, "IMPROVED"),
        (1.20, 1.30, False, "FAIL"),  # latency up 20-30% against a 10% tolerance
        (0.95, 1.05, False, "PASS"),
        (1.05, 1.15, False, "INCONCLUSIVE"),
        (0.70, 0.80, False, "IMPROVED"),
    ],
)
def test_status_rule(low: float, high: float, higher: bool, expected: str) -> None:
    tolerance = 0.05 if higher else 0.10
    assert status(Ratio((low + high) / 2, low, high, 0.95), tolerance, higher) == expected


def test_no_interval_is_inconclusive() -> None:
    assert status(Ratio(0.5, None, None, 0.95), 0.05, True) == "INCONCLUSIVE"
    assert status(None, 0.05, True) == "INCONCLUSIVE"


def test_compare_reads_payload_windows_and_latencies() -> None:
    rng = random.Random(1)
    base = {
        "tokens_per_s": 200.0,
        "windows_per_s": [rng.gauss(200, 4) for _ in range(10)],
        "latencies_ms": {"ttft": [rng.expovariate(1 / 50) for _ in range(2000)]},
    }
    cur = {
        "tokens_per_s": 150.0,
        "windows_per_s": [rng.gauss(150, 4) for _ in range(10)],
        "latencies_ms": {"ttft": [rng.expovariate(1 / 50) for _ in range(2000)]},
    }
    checks = regression.compare(cur, base, {"tokens_per_s": 0.05, "ttft_p50": 0.5}, 0.95)
    by = {c.metric: c for c in checks}
    assert by["tokens_per_s"].status == "FAIL"
    assert by["tokens_per_s"].observed == 150.0 and by["tokens_per_s"].baseline == 200.0
    assert by["ttft_p50"].status == "PASS"
    assert math.isclose(by["ttft_p50"].observed * 1000, sorted(cur["latencies_ms"]["ttft"])[1000])
    assert regression.overall([c.status for c in checks]) == "FAIL"


def _sequential_offline(speed: float, rng: random.Random) -> list:
    """16 requests queued at 0 and served one at a time: a prefill pause, then tokens
    at 50 tokens/s with 2% jitter, all of it `speed` times faster. The same prompts and
    lengths every run (a fixed Random for the work), only the speed and its jitter differ."""
    from pytest_tokperf.driver import RequestRecord

    work = random.Random(7)
    out, now = [], 0.0
    for i in range(16):
        now += work.uniform(0.05, 0.4) / speed  # prefill: no tokens
        chunks = []
        for _ in range(work.randint(10, 48)):
            now += rng.gauss(1, 0.02) / (50 * speed)
            chunks.append(int(now * 1e9))
        out.append(RequestRecord(f"r{i}", 0, chunks[-1], tuple(chunks), (1,) * len(chunks)))
    return out


def _offline_payload(records: list) -> dict:
    from pytest_tokperf import metrics

    return {
        "scenario": "offline",
        "tokens_per_s": metrics.output_tokens_per_s(records),
        "windows_per_s": metrics.window_rates(records, metrics.BATCHES),
        "token_windows_per_s": metrics.token_windows(records, metrics.BATCHES),
    }


@pytest.mark.parametrize("speed", [1.0, 0.97, 0.85])
def test_offline_runs_pair_windows_of_equal_work(speed: float) -> None:
    """The same requests at a known speed ratio: windows of equal work give an interval
    around the true ratio that is narrower than windows of equal time, whose boundaries
    cut the prefill pauses differently in the two runs."""
    rng = random.Random(3)
    base = _offline_payload(_sequential_offline(1.0, rng))
    cur = _offline_payload(_sequential_offline(speed, rng))
    (work,) = regression.compare(cur, base, {"tokens_per_s": 0.05}, 0.95)
    timed = {k: v for k, v in cur.items() if k != "token_windows_per_s"}
    (time,) = regression.compare(timed, base, {"tokens_per_s": 0.05}, 0.95)
    assert work.method == regression.TOKEN_METHOD and time.method == regression.THROUGHPUT_METHOD
    assert work.ratio == pytest.approx(cur["tokens_per_s"] / base["tokens_per_s"])
    assert work.low is not None and work.high is not None and time.low is not None
    assert work.low < speed < work.high  # the same work at `speed`: the true ratio
    assert work.high - work.low < (time.high - time.low) / 2
    assert work.status == {1.0: "PASS", 0.97: "PASS", 0.85: "FAIL"}[speed]
