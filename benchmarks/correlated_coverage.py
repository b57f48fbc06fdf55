"""Coverage of the widened interval for batches still correlated at lag 1.

AR(1) series of k window rates (true mean 10, lag-1 correlation r) are drawn; of
those the plugin's lag-1 test flags (`metrics.correlated`), the share given an
interval by `metrics.correlated_means`, and how often that 95% interval covers the
true mean. A simulation: the same on any CPU (20,000 series a cell, about 30 s).

    python benchmarks/correlated_coverage.py
"""

from __future__ import annotations

import math
import random

from pytest_tokperf.metrics import correlated, correlated_means, lag1


def series(k: int, r: float, rng: random.Random) -> list[float]:
    x = rng.gauss(0, 1) / math.sqrt(1 - r * r)  # the stationary start
    out = []
    for _ in range(k):
        x = r * x + rng.gauss(0, 1)
        out.append(10 + x)
    return out


def main() -> None:
    rng = random.Random(2)
    print("| k | r | flagged | of them no interval | coverage of the rest |")
    print("|---|---|---|---|---|")
    for k in (6, 8, 11):
        for r in (0.0, 0.3, 0.5, 0.7, 0.9):
            flagged = none = covered = 0
            for _ in range(20_000):
                values = series(k, r, rng)
                if not correlated(values):
                    continue
                flagged += 1
                iv = correlated_means(values, lag1(values) or 0.0, 0.95)
                if iv is None:
                    none += 1
                    continue
                covered += iv.low <= 10 <= iv.high
            given = flagged - none
            cover = f"{covered / given:.3f}" if given else "-"
            print(f"| {k} | {r} | {flagged} | {none / flagged:.2f} | {cover} |")


if __name__ == "__main__":
    main()
