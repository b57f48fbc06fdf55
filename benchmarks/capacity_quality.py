"""Capacity quality: how far `tokperf.capacity()`'s max_qps lands from the true capacity,
and how often `capacity_floor` is wrong with floors 10% above and below it.

The engine is issue 23's acceptance engine: `sim` with 4 slots, TTFT 0.05 s and 28
more tokens at 100 tokens/s (0.33 simulated s per request, gamma jitter CV 0.2),
time_scale 10: about 120 requests/s saturate it. SLOs: TTFT p99 2,000 ms, TPOT p99
100 ms (wall time, as the gate measures).

Truth: a grid of long fixed-rate runs (`--truth-s`, default 300 s of wall time each,
`--truth-seeds` seeds per rate, steps of `--step` requests/s), each a plain queue
simulation written here (Poisson arrivals, 4 first-come first-served slots, each
request's token times from `sim.request_timeline`), its p99s taken with
`statistics.quantiles`; not the plugin's code. The true capacity is the highest
grid rate at which most seeds' observed p99s meet every SLO.

Trials, virtual time: `capacity.search` and `capacity.judge_probe` (the plugin's own
search and judgment) on probes built the same way as the truth's runs but as the
driver's `RequestRecord`s, each probe lasting the sim profile's min_duration_s (10 s);
the budget counts virtual seconds. Each trial's search probes both floors (x0.9 and
x1.1 of the truth) and the verdict of each is `capacity.floor_check`. A wrong verdict:
FAIL at x0.9, PASS at x1.1. Virtual probes are issued on time (no client lag).

`--driver N` also runs N seeds through the real driver (`Tokperf.capacity` on the sim
engine, in wall time: about a minute a seed) as a check of the virtual model.

    python benchmarks/capacity_quality.py --seeds 200            # virtual, minutes
    python benchmarks/capacity_quality.py --seeds 0 --driver 20  # real driver
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

from pytest_tokperf import capacity, metrics
from pytest_tokperf.driver import NS, RequestRecord, poisson_offsets_ns
from pytest_tokperf.engines import EngineInfo, Request, load_engine
from pytest_tokperf.engines.sim import parse_settings, request_timeline
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.runner import Tokperf

ENGINE = {"slots": 4, "ttft_s": 0.05, "tokens_per_s": 100.0, "jitter": 0.2, "time_scale": 10.0}
TOKENS = 29  # 0.05 + 28 / 100 = 0.33 simulated s
SLOS = {"ttft_p99_ms": 2000.0, "tpot_p99_ms": 100.0}
PROBE_S = 10.0  # the sim profile's min_duration_s
BUDGET_S = 90.0
TOLERANCE = 0.02
INFO = EngineInfo("sim", "sim", "none", 1)


def timelines(rate: float, seconds: float, seed: int) -> list[tuple[int, list[int]]]:
    """(arrival, token times) in wall ns of every request of a fixed-rate run."""
    settings = parse_settings({**ENGINE, "seed": seed})
    scale = settings["time_scale"]
    free = [0] * int(settings["slots"])  # when each slot is next free
    out = []
    arrivals = itertools.takewhile(lambda at: at < seconds * NS, poisson_offsets_ns(rate, seed))
    for k, at in enumerate(arrivals):
        times, _ = request_timeline(settings, Request(f"r{k}", "", TOKENS))
        start = max(at, heapq.heappop(free))
        tokens = [start + round(t / scale * NS) for t in times]
        heapq.heappush(free, tokens[-1])
        out.append((at, tokens))
    return out


def true_p99s(rate: float, seconds: float, seed: int) -> tuple[float, float]:
    """Observed TTFT p99 and TPOT p99 (ms) of one long run, computed here."""
    ttft, tpot = [], []
    for at, tokens in timelines(rate, seconds, seed):
        ttft.append((tokens[0] - at) / 1e6)
        tpot.append((tokens[-1] - tokens[0]) / 1e6 / (len(tokens) - 1))
    return statistics.quantiles(ttft, n=100)[98], statistics.quantiles(tpot, n=100)[98]


def truth(low: float, high: float, step: float, seconds: float, seeds: int) -> float:
    """The highest grid rate whose long runs meet every SLO for most seeds."""
    best = low
    rate = low
    while rate <= high + 1e-9:
        met = sum(
            ttft <= SLOS["ttft_p99_ms"] and tpot <= SLOS["tpot_p99_ms"]
            for ttft, tpot in (true_p99s(rate, seconds, seed) for seed in range(seeds))
        )
        print(f"  truth grid {rate:7.2f} requests/s: {met}/{seeds} seeds meet the SLOs")
        if met * 2 > seeds:
            best = rate
        rate += step
    return best


def virtual_probe(rate: float, seed: int) -> capacity.Probe:
    seconds = max(PROBE_S, capacity.probe_samples(SLOS) / rate) * 1.05
    records = [
        RequestRecord(f"r{k}", at, tokens[-1], tuple(tokens), (1,) * len(tokens), scheduled_ns=at)
        for k, (at, tokens) in enumerate(timelines(rate, seconds, seed))
    ]
    result = metrics.summarize(
        records, INFO, scenario="server", workload="sim", max_tokens=TOKENS, qps=rate,
        window_end_ns=round(seconds * NS),
    )  # fmt: skip
    result = replace(result, min_duration_s=PROBE_S)
    return capacity.judge_probe(result, SLOS, result.duration_s)


def virtual_trial(seed: int, floors: Sequence[float]) -> capacity.Capacity:
    clock = [0.0]

    def probe(rate: float) -> capacity.Probe:
        p = virtual_probe(rate, 1000 + seed)
        clock[0] += p.seconds
        return p

    saturation = ENGINE["slots"] * ENGINE["time_scale"] / 0.33  # the Offline estimate's aim
    probes, stopped = capacity.search(
        probe, saturation, floors=floors, budget_s=BUDGET_S, tolerance=TOLERANCE,
        clock=lambda: clock[0],
    )  # fmt: skip
    return capacity.Capacity(
        "server", SLOS, saturation, probes, tuple(floors), TOLERANCE, BUDGET_S, clock[0], stopped
    )


def driver_trial(seed: int, floors: Sequence[float]) -> capacity.Capacity:
    """One search through the real driver, both floors probed first (the marker's and
    min_qps, as a test with the marker calling capacity(min_qps=...) would)."""
    engine = load_engine("sim", {**ENGINE, "seed": seed}, 1)
    runner = Tokperf(engine, replace(BUILTIN["sim"], warmup=0, max_tokens=TOKENS))
    runner.busy = "note"  # other jobs share this machine: said in docs/verdicts.md
    runner.capacity_floor = {"min_qps": floors[0], **SLOS}
    return runner.capacity(min_qps=floors[1], budget_s=BUDGET_S, tolerance=TOLERANCE, seed=seed)


def report(kind: str, trials: Sequence[capacity.Capacity], cap: float, floors: Sequence[float]):
    n = len(trials)
    if not n:
        return
    low, high = floors
    below = Counter(capacity.floor_check(t, low).status for t in trials)
    above = Counter(capacity.floor_check(t, high).status for t in trials)
    found = [t.max_qps for t in trials if t.max_qps is not None]
    errors = sorted(abs(f / cap - 1) for f in found)
    print(f"\n{kind}: {n} trials, true capacity {cap:.2f} requests/s")
    print(f"  floor x0.9 = {low:.1f}: {dict(below)}  wrong (FAIL): {below['FAIL'] / n:.1%}")
    print(f"  floor x1.1 = {high:.1f}: {dict(above)}  wrong (PASS): {above['PASS'] / n:.1%}")
    if errors:
        print(
            f"  max_qps found in {len(found)}: median {statistics.median(found):.1f}, "
            f"|error| median {statistics.median(errors):.1%}, max {errors[-1]:.1%}, "
            f"range {min(found):.1f}-{max(found):.1f}"
        )
    probes = [len(t.probes) for t in trials]
    print(f"  probes per search: median {statistics.median(probes)}, seconds per search: "
          f"median {statistics.median(t.seconds for t in trials):.0f}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="virtual trials")
    parser.add_argument("--driver", type=int, default=0, help="real-driver trials")
    parser.add_argument("--truth-s", type=float, default=300.0)
    parser.add_argument("--truth-seeds", type=int, default=3)
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--truth", type=float, default=None, help="skip the grid: use this")
    args = parser.parse_args(argv)
    began = time.monotonic()
    cap = args.truth
    if cap is None:
        print(f"truth: long runs of {args.truth_s:.0f} s, {args.truth_seeds} seeds per rate")
        coarse = truth(90.0, 140.0, 5.0, args.truth_s, args.truth_seeds)
        cap = truth(coarse, coarse + 5.0, args.step, args.truth_s, args.truth_seeds)
    floors = (0.9 * cap, 1.1 * cap)
    print(f"true capacity {cap:.2f} requests/s ({time.monotonic() - began:.0f} s)")
    virtual = [virtual_trial(seed, floors) for seed in range(args.seeds)]
    report("virtual time", virtual, cap, floors)
    driven = []
    for seed in range(args.driver):
        driven.append(driver_trial(seed, floors))
        print(f"  driver seed {seed}: max_qps {driven[-1].max_qps}", flush=True)
    report("real driver", driven, cap, floors)
    print(f"\n{time.monotonic() - began:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
