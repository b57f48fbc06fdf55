"""benchmarks/client_overhead.py: it runs end to end, and its interval for the median
ratio covers as often as it says."""

from __future__ import annotations

import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import client_overhead  # noqa: E402


def test_the_median_interval_covers_the_true_median_at_least_95_percent() -> None:
    # independent of the binomial arithmetic: draws from a skewed distribution whose
    # median is known (exponential: ln 2), counted
    rng = random.Random(7)
    for n in (6, 9, 11, 15):
        trials, covered = 4000, 0
        for _ in range(trials):
            low, high = client_overhead.median_interval([rng.expovariate(1.0) for _ in range(n)])
            covered += low <= 0.6931471805599453 <= high
        assert 0.95 <= covered / trials <= 0.995, (n, covered / trials)
    assert client_overhead.median_interval([1.0] * 5) is None  # too few for 95%


def test_the_benchmark_runs_and_counts_every_token() -> None:
    # tiny settings; it exits non-zero when either client counts a token wrong
    out = subprocess.run(
        [sys.executable, str(BENCH / "client_overhead.py"), "--requests", "64",
         "--paced-requests", "64", "--tokens", "8", "--concurrency", "8", "--repeats", "6"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"burst", "paced", "one-write"}
    for row in rows.values():
        tokperf, floor, ratio = float(row[1]), float(row[2]), float(row[3])
        assert tokperf > 0 and floor > 0 and ratio > 0
        # the printed ratio, interval and verdict, recomputed from the printed runs: the
        # median of the 6 paired ratios, and for 6 pairs the interval is their range
        line = " ".join(row)
        pairs = [(float(a), float(b)) for a, b in re.findall(r"(\d+\.\d+)/(\d+\.\d+)", line)[1:]]
        assert len(pairs) == 6  # (the first a/b is the tokens/read column)
        ratios = sorted(a / b for a, b in pairs)
        low, high = (float(x) for x in row[4].split("-"))
        assert ratio == pytest.approx(statistics.median(ratios), rel=0.03, abs=0.01)
        assert low == pytest.approx(ratios[0], rel=0.03, abs=0.01)
        assert high == pytest.approx(ratios[-1], rel=0.03, abs=0.01)
        said = "yes" if high <= 1.1 else "no" if low > 1.1 else "can't"
        assert row[5] == said
