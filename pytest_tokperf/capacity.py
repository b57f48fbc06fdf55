"""Capacity: the highest request rate that still meets every SLO, found by search, and
the `capacity_floor` verdict on it.

The search is an *Offline-bracketed bisection on the request rate*. An Offline run
(every request queued at once) estimates the saturation rate; the floors' rates are
probed first, always; then the bracket [highest rate that passed, lowest above it
that did not] is found from the saturation rate (up by `GROW` while probes pass, down
by halves while none has) and halved until its width is within `tolerance` of its low
end, or until the next probe would overrun the budget. It is LoadGen's
FindPeakPerformance mode (mlcommons/inference loadgen/loadgen.cc: `FindBoundaries`,
then `FindPeakPerformanceBinarySearch` on the Server target QPS) started from an
Offline estimate instead of the user's target.

Each probe is a fixed-rate Server (or Interactive) run at seeded Poisson arrivals,
judged with `verdict`'s checks:
- INVALID when the client could not issue the load (issue lag, a saturated client, a
  busy machine, another process on the GPUs): it says nothing about the engine;
- FAIL when an SLO's observed percentile misses its limit, or a request failed;
- PASS when every SLO's early-stopping estimate is met, the engine kept up with the
  schedule, no latency with an SLO climbed fast enough to miss its limit in a run
  `HORIZON` times as long (`rising`), and it lasted min_duration_s;
- INCONCLUSIVE otherwise (too few samples for the estimate, a run that fell behind or
  whose latencies climb toward the limit: a queue growing without bound).
For the search every probe but a PASS lies above the capacity.

`capacity_floor(min_concurrency=...)` searches closed-loop serving instead: each probe
keeps a whole number of requests in flight (the concurrency scenario), the search
doubles from 1 while probes pass and bisects to adjacent integers, and each probe
lasts long enough for its samples at the rate its neighbours measured
(`closed_loop_rate`). Its capacity is the most requests in flight served inside the
SLOs, as AIPerf's max-concurrency-under-SLA search reports it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_tokperf import steady, verdict
from pytest_tokperf.metrics import PERCENTILES, RunResult, e2e_s, tpot_s, ttft_s
from pytest_tokperf.verdict import Check

GROW = 1.25  # the next rate up while every probe passed
LEAST_SHARE = 1 / 64  # below this share of the saturation rate nothing is served: stop
MOST_PROBES = 40
SAMPLES_MARGIN = 1.2  # a probe expects this many times the samples LoadGen's minimum needs
HORIZON = 5.0  # a probe's latency climb is projected over a run this many times as long


UNITS = {"qps": "requests/s", "concurrency": "requests in flight"}


@dataclass(frozen=True)
class Probe:
    """One run of the search at one load and its judgment."""

    level: float  # the load: requests/s (axis qps) or requests in flight (concurrency)
    status: str  # PASS, FAIL, INCONCLUSIVE or INVALID (see the module docstring)
    why: str  # in words, when not PASS
    checks: tuple[Check, ...]  # its SLO, failed-request and validity checks
    result: RunResult
    seconds: float  # wall time the probe took
    axis: str = "qps"  # qps: a fixed-rate Server run; concurrency: a closed-loop run

    @property
    def qps(self) -> float | None:
        """The probe's scheduled rate (None for a closed-loop probe)."""
        return self.level if self.axis == "qps" else None

    def to_json(self) -> dict[str, Any]:
        r = self.result
        slos = {c.metric: _slo_json(c) for c in self.checks if c.kind == "slo"}
        return {
            "qps": self.qps,
            "concurrency": int(self.level) if self.axis == "concurrency" else None,
            "status": self.status,
            "why": self.why,
            "requests": r.requests,
            "failed": r.failed,
            "duration_s": r.duration_s,
            "scheduled_qps": r.scheduled_qps,
            "achieved_qps": r.achieved_qps,
            "tokens_per_s": r.tokens_per_s,
            "lag_p99_s": r.lag.p99,
            "slos": slos,
            "seconds": self.seconds,
        }


def _slo_json(c: Check) -> dict[str, Any]:
    return {
        "status": c.status, "observed_ms": _nan(c.observed), "limit_ms": c.limit,
        "estimate_ms": c.estimate, "count": c.count, "over": c.over, "needed": c.needed,
    }  # fmt: skip


def _nan(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


@dataclass(frozen=True)
class Capacity:
    """A capacity search: every probe, the bracket it found, and what it cost."""

    scenario: str  # server or interactive (axis qps), concurrency (axis concurrency)
    slos: dict[str, float]  # SLO keyword -> limit in ms
    saturation_qps: float  # the Offline estimate the search started from
    probes: tuple[Probe, ...]
    floors: tuple[float, ...]  # the loads probed whatever the search did (min_qps)
    tolerance: float
    budget_s: float
    seconds: float  # the whole search, the Offline estimate included
    stopped: str  # converged, budget, no passing rate, most probes
    extra: dict[str, Any] = field(default_factory=dict)
    axis: str = "qps"  # what the search varies: the request rate, or requests in flight

    @property
    def max_level(self) -> float | None:
        """The highest load whose probe passed with no probe at or below it failing by an
        observed percentile (a pass above a proven miss is noise, not capacity)."""
        return bracket(self.probes)[0]

    @property
    def max_qps(self) -> float | None:
        return self.max_level if self.axis == "qps" else None

    @property
    def max_concurrency(self) -> int | None:
        low = self.max_level
        return int(low) if self.axis == "concurrency" and low is not None else None

    @property
    def last_pass_qps(self) -> float | None:
        return self.max_qps

    @property
    def first_fail(self) -> float | None:
        """The lowest probed load above `max_level` that did not pass (its status says how)."""
        return bracket(self.probes)[1]

    @property
    def first_fail_qps(self) -> float | None:
        return self.first_fail if self.axis == "qps" else None

    def to_json(self) -> dict[str, Any]:
        method = "offline-bracketed bisection on the request rate"
        if self.axis == "concurrency":
            method = "doubling, then bisection on the integer concurrency"
        return {
            "method": method,
            "axis": self.axis,
            "unit": UNITS[self.axis],
            "scenario": self.scenario,
            "slos_ms": dict(self.slos),
            "saturation_qps": self.saturation_qps,
            "max_qps": self.max_qps,
            "max_concurrency": self.max_concurrency,
            "last_pass": self.max_level,
            "first_fail": self.first_fail,
            "floors": list(self.floors),
            "tolerance": self.tolerance,
            "budget_s": self.budget_s,
            "seconds": self.seconds,
            "stopped": self.stopped,
            "probes": [p.to_json() for p in self.probes],
        }


def bracket(probes: Sequence[Probe]) -> tuple[float | None, float | None]:
    """(highest passing load not above a failed one, lowest load above it that did not pass)."""
    failed = [p.level for p in probes if p.status == "FAIL"]
    lowest_fail = min(failed, default=math.inf)
    passed = [p.level for p in probes if p.status == "PASS" and p.level < lowest_fail]
    low = max(passed, default=None)
    above = [p.level for p in probes if p.status != "PASS" and (low is None or p.level > low)]
    return low, min(above, default=None)


def probe_samples(slos: Mapping[str, float]) -> int:
    """Requests a probe aims for: a margin over LoadGen's early-stopping minimum of its
    tightest percentile (459 for p99 at 99%: 551)."""
    ps = [PERCENTILES[verdict.slo_parts(key)[1]] for key in slos]
    least = max((verdict.samples_needed(p) for p in ps), default=0)
    return math.ceil(least * SAMPLES_MARGIN)


def judge_probe(
    result: RunResult,
    slos: Mapping[str, float],
    seconds: float,
    *,
    busy: str = "invalid",
    throttled: str = "note",
    confidence: float = 0.95,
) -> Probe:
    """A probe's status from the gate's own checks of its run (module docstring)."""
    axis = "concurrency" if result.scenario == "concurrency" else "qps"
    level = float((result.concurrency if axis == "concurrency" else result.qps) or 0.0)
    slo = verdict.slo_checks(result, slos)
    failed = verdict.failure_check(result)
    around = verdict.validity_checks(result, busy=busy, throttled=throttled, sustain=False)
    checks = (failed, *slo, *around)
    invalid = [c.detail for c in around if c.status == "INVALID"]
    if invalid:
        return Probe(level, "INVALID", "; ".join(invalid), checks, result, seconds, axis)
    missed = [_miss(c) for c in slo if c.status == "FAIL"]
    if failed.status == "FAIL":
        missed.insert(0, f"{result.failed:,} of {result.requests:,} requests failed")
    if missed:
        return Probe(level, "FAIL", "; ".join(missed), checks, result, seconds, axis)
    client = set(verdict.run_validity(result, sustain=False))
    behind = [why for why in verdict.run_validity(result) if why not in client]
    drift = rising(result, slos)
    short = verdict.duration_check(result)
    unmet = [verdict.slo_reason(c) for c in slo if c.status != "PASS"]
    why = [*behind, *drift, *([short.detail] if short else []), *unmet]
    if why:
        return Probe(level, "INCONCLUSIVE", "; ".join(why), checks, result, seconds, axis)
    return Probe(level, "PASS", "", checks, result, seconds, axis)


def rising(result: RunResult, slos: Mapping[str, float]) -> list[str]:
    """Latencies with an SLO that rose so fast the limit would be missed by a run
    `HORIZON` times as long, one reason each.

    A queue that grows without bound (a rate above the capacity) shows in a short probe
    as a latency that climbs while its percentile is still under the limit. The climb is
    `steady.latency_change`'s (Mann-Whitney between the run's first and last thirds,
    whose middles lie 2/3 of the run apart), continued for (HORIZON - 1) more runs'
    length on top of the observed percentile. A stable queue near its capacity also
    drifts between thirds, by little against the limit: that is no reason."""
    out = []
    for key, limit_ms in slos.items():
        metric, pct = verdict.slo_parts(key)
        value = _PER_REQUEST.get(metric)
        change = None if value is None else steady.latency_change(result.records, value)
        observed = getattr(getattr(result, metric), pct)
        if change is None or observed is None or not change.after > change.before:
            continue
        climb_ms = (change.after - change.before) * 1000 * (HORIZON - 1) * 3 / 2
        projected = observed * 1000 + climb_ms
        if projected > limit_ms:
            out.append(
                f"{verdict.SLO_METRICS[metric]} rose from a median of {change.before * 1000:,.1f}"
                f" ms in the run's first third to {change.after * 1000:,.1f} ms in its last: "
                f"at that climb a run {HORIZON:g} times as long ends near {pct} "
                f"{projected:,.0f} ms > limit {limit_ms:,.0f} ms (a growing queue)"
            )
    return out


_PER_REQUEST = {"ttft": ttft_s, "tpot": tpot_s, "e2e": e2e_s}


def _miss(c: Check) -> str:
    metric, pct = verdict.slo_parts(c.metric)
    return f"{verdict.SLO_METRICS[metric]} {pct} {c.observed:,.0f} ms > limit {c.limit:,.0f} ms"


def search(
    probe: Callable[[float], Probe],
    saturation: float,
    *,
    floors: Sequence[float] = (),
    budget_s: float,
    tolerance: float,
    clock: Callable[[], float] = time.monotonic,
    integer: bool = False,
) -> tuple[tuple[Probe, ...], str]:
    """Offline-bracketed bisection (module docstring): the probes in the order made, and
    why the search stopped. The floors are probed first whatever the budget; a later
    probe is made only while the time spent plus the longest probe so far fits.

    `integer` searches the concurrency instead: from 1 (or the highest pass) doubling
    while probes pass, halving while none has, then bisecting to adjacent integers."""
    start = clock()
    probes = [probe(rate) for rate in sorted(set(floors))]
    while True:
        low, high = bracket(probes)
        width = 1 if integer else tolerance * (low or 0.0)
        if low is not None and high is not None and high - low <= width:
            return tuple(probes), "converged"
        least = 1 if integer else saturation * LEAST_SHARE
        if low is None and high is not None and high <= least:
            return tuple(probes), "no passing rate"
        if len(probes) >= MOST_PROBES:
            return tuple(probes), "most probes"
        longest = max((p.seconds for p in probes), default=0.0)
        if clock() - start + longest > budget_s:
            return tuple(probes), "budget"
        probes.append(probe(_next_integer(low, high) if integer else _next(low, high, saturation)))


def closed_loop_rate(level: int, measured: Mapping[int, float], saturation: float) -> float:
    """The requests/s a closed-loop probe at `level` in flight will serve at least, so it
    can be long enough for its samples: by Little's law (rate = in flight / latency) and
    a latency that does not fall as more requests share the engine, a probe at c serves
    at least what one at l < c served, and at least c/h of what one at h > c served.
    The tightest such bound; with nothing measured the Offline saturation rate (the most
    it can serve: a probe that comes up short is made again at its own rate)."""
    bounds = [rate * min(1.0, level / at) for at, rate in measured.items() if rate > 0]
    return max(bounds, default=saturation)


def _next(low: float | None, high: float | None, saturation: float) -> float:
    """The next rate: the saturation rate, up by GROW, down by halves, or the middle."""
    if high is None:
        return saturation if low is None or low < saturation else low * GROW
    if low is None:
        return high / 2 if high <= saturation else saturation
    return (low + high) / 2


def _next_integer(low: float | None, high: float | None) -> int:
    """The next concurrency: 1, doubled, halved, or the middle (rounded down)."""
    if high is None:
        return 1 if low is None else int(low) * 2
    if low is None:
        return max(1, int(high) // 2)
    return (int(low) + int(high)) // 2


def find(
    run: Callable[..., RunResult],
    scenario: str,
    slos: Mapping[str, float],
    floors: Sequence[float],
    *,
    max_tokens: int | None,
    workload: Any,
    seed: int,
    tolerance: float,
    budget_s: float,
    least_s: float,
    saturation_requests: int,
    margin: float,
    judge: Callable[[RunResult, Mapping[str, float], float], Probe],
) -> Capacity:
    """A whole search with `run` (`Tokperf.run`): the Offline estimate, then `search`
    over probes of at least `least_s` seconds and LoadGen's minimum of samples, each
    `judge`d (`judge_probe` with the gate's policies). A Server probe lasts the samples
    at its own rate; a closed-loop probe the samples at `closed_loop_rate`, and is
    made again, longer, when it came up short of them at the rate it measured."""
    began = time.monotonic()
    offline = run("offline", saturation_requests, max_tokens, workload, seed=seed)
    saturation = offline.requests_per_s
    if not saturation > 0:
        raise ValueError(
            f"tokperf.capacity(): the Offline estimate served nothing "
            f"({offline.failed} of {offline.requests} requests failed)"
        )
    closed = scenario == "concurrency"
    samples = probe_samples(slos)
    rates: dict[int, float] = {}  # requests/s each closed-loop probe measured

    def measure(level: float, rate: float) -> RunResult:
        load = {"concurrency": int(level)} if closed else {"qps": level}
        return run(scenario, None, max_tokens, workload, **load, warmup=0, seed=seed + 1,
                   duration_s=max(least_s, samples / rate) * margin,
                   min_duration_s=least_s)  # fmt: skip

    def probe(level: float) -> Probe:
        start = time.monotonic()
        result = measure(level, closed_loop_rate(int(level), rates, saturation) if closed
                         else level)  # fmt: skip
        found = judge(result, slos, time.monotonic() - start)
        if closed:
            rates[int(level)] = result.requests_per_s
            short = result.requests < samples and found.status == "INCONCLUSIVE"
            if short and result.requests_per_s > 0:  # slower than its estimate: again
                result = measure(level, result.requests_per_s)
                rates[int(level)] = result.requests_per_s
                found = judge(result, slos, time.monotonic() - start)
        return found

    probes, stopped = search(
        probe, saturation, floors=floors, budget_s=budget_s, tolerance=tolerance, integer=closed
    )
    return Capacity(
        scenario=scenario, slos=dict(slos), saturation_qps=saturation, probes=probes,
        floors=tuple(floors), tolerance=tolerance, budget_s=budget_s,
        seconds=time.monotonic() - began, stopped=stopped,
        axis="concurrency" if closed else "qps",
    )  # fmt: skip


def floor_check(found: Capacity, floor_level: float) -> Check:
    """The capacity_floor verdict (min_qps, or min_concurrency for a closed-loop search):
    FAIL when the probe at the floor missed an SLO by its observed percentile (or failed
    requests); else PASS when a probe at or above it met every SLO; else INVALID when
    the floor's probe could not be issued; else INCONCLUSIVE."""
    at = [p for p in found.probes if math.isclose(p.level, floor_level)]
    passed = [p for p in found.probes if p.level >= floor_level and p.status == "PASS"]
    cap = found.max_level
    unit = UNITS[found.axis]
    said = (
        f"capacity {_qps(cap)} {unit} (last pass {_qps(cap)}, first "
        f"fail {_qps(found.first_fail)}; {len(found.probes)} probes in "
        f"{found.seconds:,.0f} s, stopped: {found.stopped}; Offline saturation "
        f"{_qps(found.saturation_qps)} requests/s)"
    )
    metric = "min_concurrency" if found.axis == "concurrency" else "min_qps"
    floor = f"capacity floor {floor_level:,.4g} {unit}"
    numbers = {"observed": cap, "limit": floor_level}
    if not at:
        why = f"{floor}: no probe was made at the floor; {said}"
        return verdict.check(metric, "INCONCLUSIVE", "capacity", why, **numbers)
    probe = at[0]
    if probe.status == "FAIL":
        why = f"{floor} not served: the probe at the floor missed: {probe.why}; {said}"
        return verdict.check(metric, "FAIL", "capacity", why, **numbers)
    if passed:
        best = max(p.level for p in passed)
        why = f"{floor} met: the probe at {best:,.4g} {unit} met every SLO; {said}"
        return verdict.check(metric, "PASS", "capacity", why, **numbers)
    status = "INVALID" if probe.status == "INVALID" else "INCONCLUSIVE"
    why = f"{floor}: the probe at the floor was {probe.status}: {probe.why}; {said}"
    return verdict.check(metric, status, "capacity", why, **numbers)


def cell(
    found: Mapping[str, Any], wanted: Mapping[str, Any] | None, num: Callable[[Any], str]
) -> str:
    """The summary's floor cell of a capacity test: '4 qps, found 30.4 qps'."""
    unit = "qps" if found.get("axis", "qps") == "qps" else "in flight"
    least = (wanted or {}).get("min_qps", (wanted or {}).get("min_concurrency"))
    return (f"{num(least)} {unit}, " if least else "") + f"found {num(found['last_pass'])} {unit}"


def _qps(value: float | None) -> str:
    return "none" if value is None else f"{value:,.4g}"
