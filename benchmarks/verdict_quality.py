"""Verdict quality: how often the throughput verdict is wrong, and how fast it decides.

Runs the plugin's real path (`Tokperf.run` -> driver -> metrics -> `verdict.judge`)
against the `sim` engine, whose true throughput is known from its timing model, with
the floor set so the truth is `margin` above or below it (+10% and -10% by default).
Each run is a closed loop (`scenario="concurrency"`) bounded by `max_duration_s` with
sequential early stopping at the chosen confidence; each seed draws different token
timings (jitter and stalls).

A wrong verdict is FAIL when the truth is above the floor, PASS when it is below;
INCONCLUSIVE is counted apart (not wrong, not decided). Time to verdict is the length
of the measured window when the run stopped, in simulated seconds (wall seconds
times `time_scale`), over decided runs.

The true rate is the renewal rate of the closed loop: concurrency x tokens / mean
request time, from `sim.mean_request_s` (the sim serves `slots` >= concurrency
requests at once, so there is no queueing).

Run:

    python benchmarks/verdict_quality.py               # about 1-2 minutes on 2 cores
    python benchmarks/verdict_quality.py --runs 100    # the README's figures
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from pytest_tokperf import verdict
from pytest_tokperf.engines import load_engine
from pytest_tokperf.engines.sim import mean_request_s, parse_settings
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.runner import Tokperf

# a noisy engine: gamma gaps with CV 0.5, and one token in 200 stalls for 0.5 s
SIM = {
    "tokens_per_s": 50.0,
    "ttft_s": 0.2,
    "jitter": 0.5,
    "stall_prob": 0.005,
    "stall_s": 0.5,
    "slots": 4,
    "chunk_tokens": 4,  # fewer event-loop wake-ups, so the client stays far from saturation
}


@dataclass(frozen=True)
class Outcome:
    margin: float
    seed: int
    status: str
    window_sim_s: float
    requests: int
    observed: float
    floor: float


def true_rate(settings: dict[str, float], concurrency: int, tokens: int) -> float:
    """Wall-clock tokens/s of the closed loop in the long run."""
    return concurrency * tokens / mean_request_s(settings, tokens) * settings["time_scale"]


def one_run(
    margin: float, seed: int, args: argparse.Namespace, settings: dict[str, float]
) -> Outcome:
    engine = load_engine("sim", {**SIM, "time_scale": args.time_scale, "seed": seed}, 1)
    truth = true_rate(settings, args.concurrency, args.tokens)
    floor = truth / (1 + margin)
    runner = Tokperf(engine, replace(BUILTIN["sim"], warmup=0))
    runner.floors = {"min_tokens_per_s": floor}
    runner.confidence = args.confidence
    result = runner.run(
        "concurrency",
        concurrency=args.concurrency,
        max_tokens=args.tokens,
        max_duration_s=args.max_sim_s / args.time_scale,
        seed=seed,
    )
    v = verdict.judge(result, runner.floors, confidence=args.confidence, looks=runner.looks[-1])
    return Outcome(
        margin,
        seed,
        v.status,
        result.duration_s * args.time_scale,
        result.requests,
        result.tokens_per_s,
        floor,
    )


def wilson_upper(wrong: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson interval of a proportion."""
    if n == 0:
        return 1.0
    p = wrong / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def summarize(outcomes: list[Outcome], margin: float) -> dict[str, Any]:
    mine = [o for o in outcomes if o.margin == margin]
    wrong_status = "FAIL" if margin > 0 else "PASS"
    wrong = sum(1 for o in mine if o.status == wrong_status)
    decided = [o for o in mine if o.status in ("PASS", "FAIL")]
    return {
        "margin": margin,
        "runs": len(mine),
        "right": sum(1 for o in mine if o.status == ("PASS" if margin > 0 else "FAIL")),
        "wrong": wrong,
        "inconclusive": sum(1 for o in mine if o.status == "INCONCLUSIVE"),
        "invalid": sum(1 for o in mine if o.status == "INVALID"),
        "wrong_rate": wrong / len(mine) if mine else 0.0,
        "wrong_rate_upper95": wilson_upper(wrong, len(mine)),
        "mean_time_to_verdict_sim_s": (
            statistics.mean(o.window_sim_s for o in decided) if decided else None
        ),
        "median_time_to_verdict_sim_s": (
            statistics.median(o.window_sim_s for o in decided) if decided else None
        ),
        "mean_requests": statistics.mean(o.requests for o in mine) if mine else None,
        "mean_observed_over_floor": (
            statistics.mean(o.observed / o.floor for o in mine) if mine else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=25, help="seeded runs per margin")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.10, -0.10])
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--max-sim-s", type=float, default=80.0, help="max_duration_s, simulated")
    parser.add_argument("--time-scale", type=float, default=40.0, help="simulated s per wall s")
    parser.add_argument("--json", help="also write the outcomes here")
    args = parser.parse_args(argv)

    settings = parse_settings({**SIM, "time_scale": args.time_scale})
    truth = true_rate(settings, args.concurrency, args.tokens)
    print(
        f"sim: {json.dumps(SIM)}, time_scale {args.time_scale:g}; concurrency "
        f"{args.concurrency} x {args.tokens} tokens; true rate {truth / args.time_scale:,.1f} "
        f"tokens/s simulated; confidence {args.confidence}; max_duration "
        f"{args.max_sim_s:g} simulated s; {args.runs} runs per margin",
        flush=True,
    )
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    for seed in range(args.runs):
        for margin in args.margins:
            outcomes.append(one_run(margin, seed, args, settings))
    wall = time.perf_counter() - started
    rows = [summarize(outcomes, m) for m in args.margins]
    print(f"{len(outcomes)} runs in {wall:.0f} s wall")
    print("truth vs floor  runs  right  wrong  inconclusive  invalid  wrong (95% upper)  "
          "mean/median time to verdict (sim s)")  # fmt: skip
    for r in rows:
        mean_t, median_t = r["mean_time_to_verdict_sim_s"], r["median_time_to_verdict_sim_s"]
        print(
            f"{r['margin']:+.0%}{'':10}  {r['runs']:4}  {r['right']:5}  {r['wrong']:5}  "
            f"{r['inconclusive']:12}  {r['invalid']:7}  "
            f"{r['wrong_rate']:.1%} ({r['wrong_rate_upper95']:.1%}){'':6}  "
            f"{'-' if mean_t is None else f'{mean_t:.1f}'} / "
            f"{'-' if median_t is None else f'{median_t:.1f}'}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"args": vars(args), "summary": rows, "outcomes": [o.__dict__ for o in outcomes]},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
