"""Goodput floor quality: how often `throughput_floor(min_goodput_tokens_per_s=...)` is
wrong with floors 10% below and above the true goodput.

The engine is issue 23's acceptance engine: `sim` with 4 slots, TTFT 0.05 s and 28 more
tokens at 100 tokens/s (0.33 simulated s per request, gamma jitter CV 0.2), time_scale
10: about 120 requests/s saturate it. It is offered `--qps` (default 100) Poisson
requests/s; the SLOs (TTFT p99 `--ttft-ms`, default 15 ms wall, TPOT p99 100 ms) are
tight enough that queueing makes a share of the requests miss them, so goodput lies
below throughput.

Truth: the long-run goodput, from `--truth-seeds` runs of `--truth-s` seconds (wall
time, simulated) each, computed here from the queue simulation's token times (a request
is good when its TTFT and TPOT are within the limits), not with the plugin's code.

Trials, virtual time: runs of `--run-s` seconds (default 10, the sim profile's
min_duration_s) built the same way as the driver's `RequestRecord`s, one per seed,
judged with `goodput.floor_check` (the gate's check) and `verdict.decide`. A wrong
verdict: FAIL at x0.9, PASS at x1.1. Virtual runs are issued on time (no client lag).

`--driver N` also runs N seeds through the real driver (`Tokperf.run` on the sim
engine in wall time, `--run-s` seconds each) as a check of the virtual model.

    python benchmarks/goodput_quality.py --seeds 200
    python benchmarks/goodput_quality.py --seeds 0 --driver 20
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from pytest_tokperf import goodput, metrics, verdict
from pytest_tokperf.driver import NS, RequestRecord, poisson_offsets_ns
from pytest_tokperf.engines import EngineInfo, Request, load_engine
from pytest_tokperf.engines.sim import parse_settings, request_timeline
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.runner import Tokperf

ENGINE = {"slots": 4, "ttft_s": 0.05, "tokens_per_s": 100.0, "jitter": 0.2, "time_scale": 10.0}
TOKENS = 29
INFO = EngineInfo("sim", "sim", "none", 1)


def timelines(rate: float, seconds: float, seed: int) -> list[tuple[int, list[int]]]:
    """(arrival, token times) in wall ns of every request of a fixed-rate run: Poisson
    arrivals, first come first served on the engine's slots."""
    settings = parse_settings({**ENGINE, "seed": seed})
    scale = settings["time_scale"]
    free = [0] * int(settings["slots"])
    out = []
    arrivals = itertools.takewhile(lambda at: at < seconds * NS, poisson_offsets_ns(rate, seed))
    for k, at in enumerate(arrivals):
        times, _ = request_timeline(settings, Request(f"r{k}", "", TOKENS))
        start = max(at, heapq.heappop(free))
        tokens = [start + round(t / scale * NS) for t in times]
        heapq.heappush(free, tokens[-1])
        out.append((at, tokens))
    return out


def true_goodput(rate: float, seconds: float, seed: int, slos: dict[str, float]) -> float:
    """Good output tokens per second of one long run, computed here."""
    runs = timelines(rate, seconds, seed)
    good = 0
    for at, tokens in runs:
        ttft_ms = (tokens[0] - at) / 1e6
        tpot_ms = (tokens[-1] - tokens[0]) / 1e6 / (len(tokens) - 1)
        if ttft_ms <= slos["ttft_p99_ms"] and tpot_ms <= slos["tpot_p99_ms"]:
            good += len(tokens)
    span = max(t[-1] for _, t in runs) - runs[0][0]
    return good * NS / span


def virtual_status(rate: float, seconds: float, seed: int, floor: float,
                   slos: dict[str, float]) -> tuple[str, float]:  # fmt: skip
    records = [
        RequestRecord(f"r{k}", at, tokens[-1], tuple(tokens), (1,) * len(tokens), scheduled_ns=at)
        for k, (at, tokens) in enumerate(timelines(rate, seconds, seed))
    ]
    result = metrics.summarize(
        records, INFO, scenario="server", workload="sim", max_tokens=TOKENS, qps=rate,
        window_end_ns=records[0].issue_ns + round(seconds * NS),
    )  # fmt: skip
    check = goodput.floor_check(result, floor, slos, 0.95)
    return verdict.decide([check]), check.observed or 0.0


def driver_status(rate: float, seconds: float, seed: int, floors: Sequence[float],
                  slos: dict[str, float]) -> list[tuple[str, float]]:  # fmt: skip
    engine = load_engine("sim", {**ENGINE, "seed": seed}, 1)
    runner = Tokperf(engine, replace(BUILTIN["sim"], warmup=0, max_tokens=TOKENS))
    result = runner.run("server", qps=rate, duration_s=seconds, seed=seed, min_duration_s=0)
    out = []
    for floor in floors:
        checks = [goodput.floor_check(result, floor, slos, 0.95),
                  *verdict.validity_checks(result, busy="note")]  # fmt: skip
        out.append((verdict.decide(checks), checks[0].observed or 0.0))
    return out


def report(kind: str, statuses: Sequence[tuple[str, str]], observed: Sequence[float],
           truth: float) -> None:  # fmt: skip
    n = len(statuses)
    if not n:
        return
    below = Counter(s for s, _ in statuses)
    above = Counter(s for _, s in statuses)
    print(f"\n{kind}: {n} runs, true goodput {truth:,.1f} output tokens/s")
    print(f"  floor x0.9: {dict(below)}  wrong (FAIL): {below['FAIL'] / n:.1%}")
    print(f"  floor x1.1: {dict(above)}  wrong (PASS): {above['PASS'] / n:.1%}")
    errors = sorted(abs(o / truth - 1) for o in observed)
    print(f"  observed goodput: median {statistics.median(observed):,.1f}, |error| median "
          f"{statistics.median(errors):.1%}, max {errors[-1]:.1%}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="virtual runs")
    parser.add_argument("--driver", type=int, default=0, help="real-driver runs")
    parser.add_argument("--qps", type=float, default=100.0)
    parser.add_argument("--ttft-ms", type=float, default=15.0)
    parser.add_argument("--run-s", type=float, default=10.0)
    parser.add_argument("--truth-s", type=float, default=600.0)
    parser.add_argument("--truth-seeds", type=int, default=5)
    args = parser.parse_args(argv)
    began = time.monotonic()
    slos = {"ttft_p99_ms": args.ttft_ms, "tpot_p99_ms": 100.0}
    truths = [true_goodput(args.qps, args.truth_s, 10_000 + s, slos)
              for s in range(args.truth_seeds)]  # fmt: skip
    truth = statistics.mean(truths)
    throughput = args.qps * TOKENS
    print(f"qps {args.qps:g}, SLOs {slos}: true goodput {truth:,.1f} tokens/s "
          f"(seeds {', '.join(f'{t:,.1f}' for t in truths)}; offered {throughput:,.0f} "
          f"tokens/s), {time.monotonic() - began:.0f} s")  # fmt: skip
    floors = (0.9 * truth, 1.1 * truth)
    statuses, observed = [], []
    for seed in range(args.seeds):
        low, seen = virtual_status(args.qps, args.run_s, seed, floors[0], slos)
        high, _ = virtual_status(args.qps, args.run_s, seed, floors[1], slos)
        statuses.append((low, high))
        observed.append(seen)
    report("virtual time", statuses, observed, truth)
    driven, seen_driven = [], []
    for seed in range(args.driver):
        (low, seen), (high, _) = driver_status(args.qps, args.run_s, seed, floors, slos)
        driven.append((low, high))
        seen_driven.append(seen)
        print(f"  driver seed {seed}: goodput {seen:,.1f}, x0.9 {low}, x1.1 {high}", flush=True)
    report("real driver", driven, seen_driven, truth)
    print(f"\n{time.monotonic() - began:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
