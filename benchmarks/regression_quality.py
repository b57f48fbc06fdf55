"""Regression verdict quality: false regressions of an unchanged engine, and power.

Runs the plugin's real path (`Tokperf.run` -> driver -> metrics) against the `sim`
engine in pairs: a baseline run with one seed and a current run with another, then
judges the pair with `regression.compare` exactly as `--tokperf-compare-baseline` does
(log-ratio t interval with Welch df over the two runs' batch-means windows).

For each noise level it counts, over unchanged pairs (same engine, different seeds):
- false FAIL at the default tolerance (5%): the rate that must stay <= 1 - confidence;
- miscoverage: the interval excludes the true ratio 1 (the stricter check of the
  interval itself: about 1 - confidence if the interval is right);
and, over pairs whose current engine is 20% slower, how often the verdict is FAIL.

Run:

    python benchmarks/regression_quality.py               # about 3 minutes on 2 cores
    # the figures in docs/baselines-ci.md:
    python benchmarks/regression_quality.py --pairs 60 --power-pairs 10 --sim-s 40 --time-scale 40
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from typing import Any

from pytest_tokperf import regression
from pytest_tokperf.engines import load_engine
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.runner import Tokperf

# token-gap coefficient of variation, stall probability per token (0.5 s stalls)
NOISE = {
    "low": {"jitter": 0.2, "stall_prob": 0.0},
    "medium": {"jitter": 0.5, "stall_prob": 0.005},
    "high": {"jitter": 1.0, "stall_prob": 0.02},
}
BASE = {"tokens_per_s": 50.0, "ttft_s": 0.2, "stall_s": 0.5, "slots": 4, "chunk_tokens": 4}


def payload(noise: str, seed: int, speed: float, args: argparse.Namespace) -> dict[str, Any]:
    """One run's numbers, as the baseline and the comparison see them."""
    from pytest_tokperf.baseline import extras

    settings = {**BASE, **NOISE[noise], "time_scale": args.time_scale, "seed": seed}
    settings["tokens_per_s"] = BASE["tokens_per_s"] * speed
    engine = load_engine("sim", settings, 1)
    runner = Tokperf(engine, replace(BUILTIN["sim"], warmup=0))
    if args.scenario == "offline":  # the same requests every run: windows of equal work
        result = runner.run("offline", requests=args.requests, max_tokens=64, seed=seed)
    else:
        result = runner.run(
            "concurrency",
            concurrency=4,
            max_tokens=64,
            duration_s=args.sim_s / args.time_scale,
            seed=seed,
        )
    out = {"tokens_per_s": result.tokens_per_s, **extras(result, {}, latencies=False)}
    if args.time_windows:  # the equal-time pairing, for a side-by-side comparison
        out.pop("token_windows_per_s", None)
    return out


def wilson_upper(k: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson interval of a proportion."""
    if n == 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="pairs per noise level")
    parser.add_argument("--power-pairs", type=int, default=10, help="pairs at the slowdown")
    parser.add_argument("--slowdown", type=float, default=0.8, help="the slower engine's speed")
    parser.add_argument("--scenario", choices=("concurrency", "offline"), default="concurrency")
    parser.add_argument("--requests", type=int, default=64, help="per Offline run")
    parser.add_argument("--time-windows", action="store_true", help="pair windows of equal time")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--tolerance", type=float, default=regression.DEFAULT_TOLERANCE)
    parser.add_argument("--sim-s", type=float, default=60.0, help="run length, simulated s")
    parser.add_argument("--time-scale", type=float, default=20.0, help="simulated s per wall s")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    tol = {regression.THROUGHPUT: args.tolerance}
    print(
        f"sim {json.dumps(BASE)}, "
        + (
            f"Offline {args.requests} x 64 tokens"
            if args.scenario == "offline"
            else f"concurrency 4 x 64 tokens, {args.sim_s:g} simulated s per run"
        )
        + f", time_scale {args.time_scale:g}; confidence {args.confidence}, tolerance "
        f"{args.tolerance:.0%}; {args.pairs} unchanged pairs and {args.power_pairs} pairs at "
        f"{args.slowdown:g}x per noise level",
        flush=True,
    )
    rows = []
    started = time.perf_counter()
    for noise in NOISE:
        fails = misses = n = caught = passed = 0
        method = ""
        widths = []
        for i in range(args.pairs):
            base = payload(noise, 2 * i, 1.0, args)
            cur = payload(noise, 2 * i + 1, 1.0, args)
            (check,) = regression.compare(cur, base, tol, args.confidence)
            n += 1
            fails += check.status == "FAIL"
            assert check.low is not None and check.high is not None
            misses += not check.low <= 1.0 <= check.high
            widths.append(check.high - check.low)
        for i in range(args.power_pairs):
            base = payload(noise, 1000 + 2 * i, 1.0, args)
            cur = payload(noise, 1001 + 2 * i, args.slowdown, args)
            (check,) = regression.compare(cur, base, tol, args.confidence)
            caught += check.status == "FAIL"
            passed += check.status in ("PASS", "IMPROVED")  # beyond the tolerance: wrong
            method = check.method
        row = {
            "noise": noise,
            **NOISE[noise],
            "pairs": n,
            "false_fail": fails,
            "false_fail_upper95": wilson_upper(fails, n),
            "miscovered": misses,
            "miscovered_upper95": wilson_upper(misses, n),
            "median_ci_width": sorted(widths)[len(widths) // 2],
            "slowdown_pairs": args.power_pairs,
            "slowdown_caught": caught,
            "slowdown_passed": passed,
            "method": method,
        }
        rows.append(row)
        print(
            f"{noise:6}  jitter {row['jitter']:.1f} stalls {row['stall_prob']:.3f}: "
            f"false FAIL {fails}/{n} (95% upper {row['false_fail_upper95']:.1%}), interval "
            f"missed 1.0 in {misses}/{n} ({row['miscovered_upper95']:.1%}), median CI width "
            f"{row['median_ci_width']:.3f}; {args.slowdown:g}x FAILed {caught}/{args.power_pairs}, "
            f"PASSed {passed} ({method})",
            flush=True,
        )
    print(f"{time.perf_counter() - started:.0f} s wall")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
