"""False alarms and detections of `history`'s change points on synthetic nightly series.

Each series is RUNS nightly tokens/s values, 200 tokens/s with Gaussian run-to-run noise
(coefficient of variation CV), in four patterns:
- none: no change (any change point is a false alarm);
- outlier: no change, but one night (run 30) at 20% below (any change point is false);
- step: 3% lower from run 20 on (detected: a change point within 2 runs of run 20);
- drift: flat to run 30, then 1% lower each run to the end (detected: a change point
  at run 28 or later; each step is inside a 5% pairwise tolerance).
"Exit 1" is the nightly gate: the newest change point is a regression beyond the 5%
tolerance (`history.regressed`). "Pairwise" is, for contrast, a gate comparing each
night with the night before at the same 5% tolerance: how often it fired on any night.
Run: python benchmarks/history_quality.py [SEEDS]
"""

from __future__ import annotations

import itertools
import random
import sys

from pytest_tokperf import changepoints, history

RUNS = 40
TOLERANCE = 0.05


def series(pattern: str, cv: float, rng: random.Random) -> list[float]:
    out = []
    for i in range(RUNS):
        mean = 200.0
        if pattern == "step" and i >= 20:
            mean *= 0.97
        if pattern == "drift" and i >= 30:
            mean *= 0.99 ** (i - 29)
        value = mean * (1 + rng.gauss(0, cv))
        if pattern == "outlier" and i == 30:
            value *= 0.8
        out.append(value)
    return out


def hit(pattern: str, found: list[changepoints.Change]) -> bool:
    if pattern == "step":
        return any(abs(c.index - 20) <= 2 for c in found)
    if pattern == "drift":
        return any(c.index >= 28 for c in found)
    return bool(found)  # none / outlier: a false alarm


def main(seeds: int) -> None:
    print(
        f"{seeds} seeds per row, {RUNS} runs per series, alpha {changepoints.ALPHA}, "
        f"at least {changepoints.MIN_RUNS} runs a side"
    )
    print(f"{'pattern':8} {'CV':>4} {'rate':>22} {'exit 1 (regression >5%)':>24} {'pairwise':>9}")
    for cv in (0.01, 0.02):
        for pattern in ("none", "outlier", "step", "drift"):
            hits = exits = pairs = 0
            for seed in range(seeds):
                rng = random.Random(f"{pattern}-{cv}-{seed}")
                values = series(pattern, cv, rng)
                found = changepoints.changes(values)
                pairs += any(b < a * (1 - TOLERANCE) for a, b in itertools.pairwise(values))
                hits += hit(pattern, found)
                exits += history.regressed(found, "tokens_per_s", TOLERANCE)
            what = "false alarms" if pattern in ("none", "outlier") else "detected"
            print(
                f"{pattern:8} {cv:4.0%} {what + f' {hits / seeds:6.2%}':>22} {exits / seeds:24.2%}"
                f" {pairs / seeds:9.2%}"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
