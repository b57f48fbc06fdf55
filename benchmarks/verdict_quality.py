"""Verdict quality: how often a decisive verdict is wrong, and how fast it comes.

Throughput cells: a closed loop (4 requests in flight, 64 tokens each) on the `sim`
engine's timing model, whose true rate is known, against floors at the true rate x
0.90, 0.95, 1.00, 1.05 and 1.10; each run is bounded by `max_duration_s` (60
simulated s) with sequential early stopping at 95% overall (`sequential.Sequential`),
then judged by `verdict.judge`. Two engines: independent noise (gamma gaps, stalls),
and the same with phases (`slow_factor=0.6, phase_s=3`: the engine alternates full
and 60% speed, each phase an exponential time of mean 3 s).

Latency cells: a Server run (Poisson arrivals, no queueing) whose TTFT is
exponential, with the `latency_slo` limit set so a known share of requests is over
it (0.1%, 1%, 1.5% at p99 and p90, and 5%, 10%, 15% at p90), judged by LoadGen's
early-stopping rule (`slo.slo_check`) after a fixed number of requests.

A wrong verdict is the decisive one on the wrong side of the truth: FAIL when the
truth meets the floor/limit, PASS when it misses; at x1.00 and at exactly the
percentile's share the truth sits on the limit and no verdict is wrong.

Virtual time: each run is simulated, not slept through. `closed_loop` and
`server_run` apply the sim engine's own timing model (`sim.request_timeline` for
each request, `sim.Phases` for the engine's phases) to the scenario's issue rule and
build the `RequestRecord`s the driver would record (at each look, in-flight requests
cut at that instant, as the driver's snapshots are); the verdict path is the
plugin's own (`Sequential`, `metrics.summarize`, `verdict.judge`). `--driver N`
also runs N seeds of each throughput cell through the real driver (`Tokperf.run` on
the sim engine at `--time-scale`) as a check of the virtual-time model.

Run (329 s wall with `--driver 10` on a 2-core machine busy with other jobs):

    python benchmarks/verdict_quality.py --driver 10     # 200 seeds per cell
    python benchmarks/verdict_quality.py --seeds 20      # a quick look
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pytest_tokperf import judgment, metrics, regression, sequential, verdict
from pytest_tokperf.driver import NS, RequestRecord, poisson_offsets_ns
from pytest_tokperf.engines import EngineInfo, Request, load_engine
from pytest_tokperf.engines.sim import (
    Phases,
    mean_request_s,
    mean_speed,
    parse_settings,
    request_timeline,
)
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.runner import Tokperf

# a noisy engine: gamma gaps with CV 0.5, and one token in 200 stalls for 0.5 s
NOISE = {
    "tokens_per_s": 50.0,
    "ttft_s": 0.2,
    "jitter": 0.5,
    "stall_prob": 0.005,
    "stall_s": 0.5,
    "slots": 4,
    "chunk_tokens": 4,
}
PHASES = {**NOISE, "slow_factor": 0.6, "phase_s": 3.0}
ENGINES = {"noise": NOISE, "phases": PHASES}
FLOORS = (0.90, 0.95, 1.00, 1.05, 1.10)  # floor / true rate
CONCURRENCY, TOKENS, MAX_S = 4, 64, 60.0
# latency: exponential TTFT (jitter 1 makes the gamma an exponential), no queueing
LATENCY = {"tokens_per_s": 50.0, "ttft_s": 0.1, "jitter": 1.0, "slots": 10_000}
QPS = 5.0
SLO_CELLS = (
    ("p99", 0.001),
    ("p99", 0.01),
    ("p99", 0.015),
    ("p90", 0.001),
    ("p90", 0.01),
    ("p90", 0.015),
    ("p90", 0.05),
    ("p90", 0.10),
    ("p90", 0.15),
)
INFO = EngineInfo("sim", "sim", "none", 1)


def _record(
    rid: str,
    issue: int,
    chunks: Sequence[int],
    tokens: Sequence[int],
    scheduled: int | None = None,
    cut: int | None = None,
) -> RequestRecord:
    """The driver's record of a request; `cut`: as a snapshot at that instant sees it."""
    if cut is not None and chunks[-1] > cut:  # in flight at `cut`: as far as it got
        n = sum(1 for c in chunks if c <= cut)
        return RequestRecord(
            rid, issue, cut, tuple(chunks[:n]), tuple(tokens[:n]), scheduled_ns=scheduled
        )
    return RequestRecord(rid, issue, chunks[-1], tuple(chunks), tuple(tokens),
                         scheduled_ns=scheduled)  # fmt: skip


def _chunked(
    settings: dict[str, float], times: Sequence[float], start: float, phases: Phases
) -> tuple[list[int], list[int]]:
    """Chunk arrival times (ns) and sizes of a request whose service starts at `start`."""
    per = int(settings["chunk_tokens"])
    chunks, sizes = [], []
    for i in range(0, len(times), per):
        last = times[min(i + per, len(times)) - 1]
        chunks.append(round(phases.after(start, last) * NS))
        sizes.append(min(per, len(times) - i))
    return chunks, sizes  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    cell: str
    status: str
    decided_s: float | None  # simulated seconds to a decisive verdict


def closed_loop(
    settings: dict[str, float],
    stop: Callable[[Sequence[RequestRecord], float], bool],
    max_s: float,
    looks: Iterable[float],
    lanes: int = CONCURRENCY,
) -> tuple[list[RequestRecord], int]:
    """A closed loop of `lanes` lanes in virtual time; `stop` asked at each look.

    Returns every request issued before the stop (completed) and the window's end.
    """
    phases = Phases(
        settings["slow_factor"], settings["phase_s"], int(settings["seed"]),
        settings["throttle_after_s"], settings["throttle_factor"],
    )  # fmt: skip
    issued: list[tuple[str, int, list[int], list[int]]] = []
    for lane in range(lanes):
        at, k = 0.0, 0
        while at < max_s:
            rid = f"l{lane}-{k}"
            times, _ = request_timeline(settings, Request(rid, "", TOKENS))
            chunks, sizes = _chunked(settings, times, at, phases)
            issued.append((rid, round(at * NS), chunks, sizes))
            at, k = chunks[-1] / NS, k + 1
    issued.sort(key=lambda r: r[1])
    end = round(max_s * NS)
    for look in looks:
        now = round(look * NS)
        snap = [_record(r, i, c, s, cut=now) for r, i, c, s in issued if i < now]
        if stop(snap, look):
            end = now
            break
    return [_record(r, i, c, s) for r, i, c, s in issued if i < end], end


def throughput_run(engine: str, factor: float, seed: int, confidence: float) -> Outcome:
    settings = parse_settings({**ENGINES[engine], "seed": seed})
    floor = true_rate(settings) * factor
    floors = {"min_tokens_per_s": floor}
    stop = sequential.Sequential(MAX_S, floors, 1, confidence)
    records, end = closed_loop(settings, stop, MAX_S, stop.times)
    result = metrics.summarize(
        records, INFO, scenario="concurrency", workload="sim", max_tokens=TOKENS,
        concurrency=CONCURRENCY, window_end_ns=end,
    )  # fmt: skip
    v = verdict.judge(result, floors, confidence=confidence, looks=stop.looks)
    decided = end / NS if v.status in ("PASS", "FAIL") else None
    return Outcome(f"{engine} x{factor:.2f}", v.status, decided)


def true_rate(settings: dict[str, float], lanes: int = CONCURRENCY) -> float:
    """Long-run tokens/s of the closed loop (simulated): lanes x tokens / mean request
    time, times the mean speed over fast and slow phases (no queueing: slots >= lanes)."""
    full = parse_settings({k: v for k, v in settings.items() if not k.startswith("throttle")})
    return lanes * TOKENS / mean_request_s(full, TOKENS) * mean_speed(full)


@dataclass(frozen=True)
class Timescale:
    """An engine whose slow side takes time to show, and the run that judges it: at
    most `max_s`, nothing decided before `min_s` (simulated seconds), `lanes` in flight.
    `truth` is the rate the engine keeps for good; `wrong` the verdict that is wrong
    against a floor at truth x factor (None: either)."""

    name: str
    settings: dict[str, float]
    lanes: int
    max_s: float
    min_s: float
    truth: float
    factors: tuple[float, ...]


STEADY_LANES = 2
TIMESCALES = (
    # phases of 30 and 100 simulated s (3 and 10 s at time_scale 10): longer than a
    # decision at 1/16 of the run, so a run that began fast could stop before a slow one
    Timescale("phases 30 s", {**NOISE, "slow_factor": 0.6, "phase_s": 30.0}, STEADY_LANES,
              300.0, 100.0, true_rate({**PHASES, "phase_s": 30.0}, STEADY_LANES), (0.9, 1.1)),
    Timescale("phases 100 s", {**NOISE, "slow_factor": 0.6, "phase_s": 100.0}, STEADY_LANES,
              600.0, 100.0, true_rate({**PHASES, "phase_s": 100.0}, STEADY_LANES), (0.9, 1.1)),
    # fast for 200 simulated s, then 0.6x for good; the floor at 0.8x the fresh rate:
    # its truth (0.6x) misses it, so any PASS is wrong
    Timescale("throttle 0.6x after 200 s", {**NOISE, "throttle_after_s": 200.0,
              "throttle_factor": 0.6}, STEADY_LANES, 600.0, 300.0,
              0.6 * true_rate(NOISE, STEADY_LANES), (0.8 / 0.6,)),
    # half speed for its first 20 s (a warm-up), then the noise engine for good
    Timescale("warm-up 0.5x for 20 s", {**NOISE, "tokens_per_s": 25.0, "ttft_s": 0.4,
              "stall_s": 1.0, "throttle_after_s": 20.0, "throttle_factor": 2.0},
              STEADY_LANES, 300.0, 100.0, true_rate(NOISE, STEADY_LANES), (0.9, 1.1)),
)  # fmt: skip


def timescale_run(cell: Timescale, factor: float, seed: int, confidence: float) -> Outcome:
    """One run of a timescale cell: early stopping and the verdict as the plugin has them."""
    settings = parse_settings({**cell.settings, "seed": seed})
    floors = {"min_tokens_per_s": cell.truth * factor}
    stop = sequential.Sequential(cell.max_s, floors, 1, confidence, min_duration_s=cell.min_s)
    # asked as often as the driver asks (every max / 64): a look due before the minimum
    # is taken at the minimum
    asked = [cell.max_s * i / 64 for i in range(1, 64)]
    records, end = closed_loop(settings, stop, cell.max_s, asked, cell.lanes)
    result = metrics.summarize(
        records, INFO, scenario="concurrency", workload="sim", max_tokens=TOKENS,
        concurrency=cell.lanes, window_end_ns=end,
    )  # fmt: skip
    result = replace(result, min_duration_s=cell.min_s)
    v = verdict.judge(result, floors, confidence=confidence, looks=stop.looks)
    decided = end / NS if v.status in ("PASS", "FAIL") else None
    return Outcome(f"{cell.name} x{factor:.2f}", v.status, decided)


def server_run(pct: str, share: float, requests: int, seed: int) -> Outcome:
    """A Server run of `requests` Poisson arrivals; TTFT limit with `share` over it."""
    settings = parse_settings({**LATENCY, "seed": seed, "output_tokens": 4})
    phases = Phases(1.0, 0.0, seed)
    records = []
    offsets = poisson_offsets_ns(QPS, seed)
    for k in range(requests):
        at = next(offsets)
        times, _ = request_timeline(settings, Request(f"r{k}", "", 4))
        chunks, sizes = _chunked(settings, times, at / NS, phases)
        records.append(_record(f"r{k}", at, chunks, sizes, scheduled=at))
    limit_ms = -settings["ttft_s"] * math.log(share) * 1000  # P(exponential > limit) = share
    result = metrics.summarize(
        records, INFO, scenario="server", workload="sim", max_tokens=4, qps=QPS
    )
    v = verdict.judge(result, {}, {f"ttft_{pct}_ms": limit_ms})
    decided = result.duration_s if v.status in ("PASS", "FAIL") else None
    return Outcome(f"{pct} {share:.1%} over, {requests}", v.status, decided)


def driver_run(
    engine: str, factor: float, seed: int, confidence: float, time_scale: float
) -> Outcome:
    """The same throughput cell through the real driver, in scaled wall time."""
    settings = parse_settings({**ENGINES[engine], "seed": seed, "time_scale": time_scale})
    runner = Tokperf(load_engine("sim", settings, 1), replace(BUILTIN["sim"], warmup=0))
    runner.floors = {"min_tokens_per_s": true_rate(settings) * factor * time_scale}
    runner.confidence = confidence
    result = runner.run(
        "concurrency",
        concurrency=CONCURRENCY,
        max_tokens=TOKENS,
        max_duration_s=MAX_S / time_scale,
        seed=seed,
    )
    v = verdict.judge(result, runner.floors, confidence=confidence, looks=runner.looks[-1])
    decided = result.duration_s * time_scale if v.status in ("PASS", "FAIL") else None
    return Outcome(f"driver {engine} x{factor:.2f}", v.status, decided)  # fmt: skip


def driver_timescale_run(cell: Timescale, factor: float, seed: int, scale: float) -> Outcome:
    """A timescale cell through the real plugin path (`Tokperf.run` on the sim engine at
    `scale` x time, its minimum and maximum in wall seconds): the issue's own setup."""
    settings = parse_settings({**cell.settings, "seed": seed, "time_scale": scale})
    profile = replace(BUILTIN["sim"], warmup=0, min_duration_s=cell.min_s / scale)
    runner = Tokperf(load_engine("sim", settings, 1), profile)
    runner.floors = {"min_tokens_per_s": cell.truth * factor * scale}
    runner.judged = True
    result = runner.run("concurrency", concurrency=cell.lanes, max_tokens=TOKENS,
                        max_duration_s=cell.max_s / scale, seed=seed)  # fmt: skip
    v = verdict.judge(result, runner.floors, looks=runner.looks[-1])
    decided = result.duration_s * scale if v.status in ("PASS", "FAIL") else None
    return Outcome(f"driver {cell.name} x{factor:.2f}", v.status, decided)


def wilson_upper(k: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson interval of a proportion."""
    if n == 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def row(cell: str, wrong_status: str | None, outcomes: list[Outcome]) -> dict[str, Any]:
    n = len(outcomes)
    share = {s: sum(1 for o in outcomes if o.status == s) / n for s in judgment.STATUSES}
    wrong = sum(1 for o in outcomes if o.status == wrong_status)
    times = [o.decided_s for o in outcomes if o.decided_s is not None]
    return {
        "cell": cell,
        "runs": n,
        **share,
        "wrong": None if wrong_status is None else wrong / n,
        "wrong_upper95": None if wrong_status is None else wilson_upper(wrong, n),
        "median_decided_s": statistics.median(times) if times else None,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| cell | runs | PASS | FAIL | INCONCLUSIVE | INVALID | wrong (95% upper) "
          "| median s to decisive |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        wrong = "-" if r["wrong"] is None else f"{_pct(r['wrong'])} ({_pct(r['wrong_upper95'])})"
        t = r["median_decided_s"]
        print(
            f"| {r['cell']} | {r['runs']} | {_pct(r['PASS'])} | {_pct(r['FAIL'])} | "
            f"{_pct(r['INCONCLUSIVE'])} | {_pct(r['INVALID'])} | {wrong} | "
            f"{'-' if t is None else f'{t:.1f}'} |"
        )


def _stored(records: Sequence[RequestRecord], end: int) -> dict[str, Any]:
    """What a baseline keeps of a run (baseline.extras): its window rates and rate."""
    return {
        "windows_per_s": metrics.window_rates(records, metrics.BATCHES, end),
        "tokens_per_s": metrics.window_tokens_per_s(records, end),
    }


def regression_run(
    engine: dict[str, float], seed: int, confidence: float, decide_regression: bool
) -> Outcome:
    """The CI recipe (docs/baselines-ci.md): a baseline run with an easy floor (0.5 x
    truth), then the unchanged engine (another seed) compared with it at a 5% tolerance. When
    `decide_regression`, early stopping decides the comparison too and the baseline
    run, the yardstick, runs its whole length; else (as before) both stop with the
    floor."""
    settings = parse_settings({**engine, "seed": 10_000 + seed})
    floors = {"min_tokens_per_s": 0.5 * true_rate(settings)}
    first = sequential.Sequential(MAX_S, floors, 1, confidence, min_duration_s=10.0)
    # a run that saves a baseline runs its whole length when the comparison is decided
    # too (it is the yardstick); before, it stopped with its floor
    records, end = closed_loop(settings, first, MAX_S, [] if decide_regression else first.times)
    stored = _stored(records, end)
    tolerances = {"tokens_per_s": 0.05}
    settings = parse_settings({**engine, "seed": seed})
    base = (stored, tolerances) if decide_regression else None
    stop = sequential.Sequential(MAX_S, floors, 1, confidence, min_duration_s=10.0, baseline=base)
    records, end = closed_loop(settings, stop, MAX_S, stop.times)
    current = _stored(records, end)
    (check,) = regression.compare(current, stored, tolerances, confidence)
    status = {"IMPROVED": "PASS"}.get(check.status, check.status)
    return Outcome("regression", status, end / NS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="seeded runs per cell")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--slo-requests", type=int, nargs="+", default=[459, 1157])
    parser.add_argument("--driver", type=int, default=0, help="seeds per cell via the driver")
    parser.add_argument("--time-scale", type=float, default=20.0)
    parser.add_argument("--timescale-seeds", type=int, default=50,
                        help="seeded runs per cell of the slow-to-show engines")  # fmt: skip
    parser.add_argument("--only-timescales", action="store_true")
    parser.add_argument("--driver-timescales", type=int, default=0,
                        help="seeds of the 30 s phases cell through the real driver")  # fmt: skip
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = []
    for cell in TIMESCALES:
        print(f"# {cell.name}: {cell.settings}, {cell.lanes} lanes, runs of at most "
              f"{cell.max_s:g} s, none decided before {cell.min_s:g} s, "
              f"truth {cell.truth:.1f} tokens/s", flush=True)  # fmt: skip
        for factor in cell.factors:
            outs = [timescale_run(cell, factor, s, args.confidence)
                    for s in range(args.timescale_seeds)]  # fmt: skip
            wrong = "FAIL" if factor < 1 else "PASS" if factor > 1 else None
            rows.append(row(f"{cell.name}, floor = truth x {factor:.2f}", wrong, outs))
    for name, engine in (("sim profile", dict(BUILTIN["sim"].engine)), ("noise", NOISE)):
        for decide in (False, True):
            outs = [regression_run(engine, s, args.confidence, decide)
                    for s in range(args.timescale_seeds)]  # fmt: skip
            how = "early stopping decides it too" if decide else "stopping on the floor alone"
            cell = f"unchanged {name} engine vs its baseline, easy floor, {how}"
            rows.append(row(cell, "FAIL", outs))
    for factor in TIMESCALES[0].factors if args.driver_timescales else ():
        outs = [driver_timescale_run(TIMESCALES[0], factor, s, 10.0)
                for s in range(args.driver_timescales)]  # fmt: skip
        wrong = "FAIL" if factor < 1 else "PASS"
        rows.append(row(f"driver at 10x: {TIMESCALES[0].name}, x{factor:.2f}", wrong, outs))
    if args.only_timescales:
        print_table(rows)
        return 0
    for engine in ENGINES:
        truth = true_rate(parse_settings(ENGINES[engine]))
        print(f"# {engine}: {ENGINES[engine]}, true rate {truth:.1f} tokens/s", flush=True)
        for factor in FLOORS:
            outs = [throughput_run(engine, factor, s, args.confidence) for s in range(args.seeds)]
            wrong = "FAIL" if factor < 1 else "PASS" if factor > 1 else None
            rows.append(row(f"throughput, {engine}, floor = truth x {factor:.2f}", wrong, outs))
    for requests in args.slo_requests:
        for pct, share in SLO_CELLS:
            allowed = 1 - metrics.PERCENTILES[pct]
            outs = [server_run(pct, share, requests, s) for s in range(args.seeds)]
            wrong = (
                "FAIL" if share < allowed - 1e-12 else "PASS" if share > allowed + 1e-12 else None
            )
            rows.append(
                row(f"TTFT {pct}, {share:.1%} over the limit, {requests} requests", wrong, outs)
            )
    if args.driver:
        for engine in ENGINES:
            for factor in (0.90, 1.10):
                outs = [
                    driver_run(engine, factor, s, args.confidence, args.time_scale)
                    for s in range(args.driver)
                ]
                wrong = "FAIL" if factor < 1 else "PASS"
                rows.append(row(f"driver: {engine}, x{factor:.2f}", wrong, outs))
    print(f"{time.perf_counter() - started:.0f} s wall; confidence {args.confidence}, "
          f"{args.seeds} seeds per cell, max {MAX_S:g} simulated s per throughput run")  # fmt: skip
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
