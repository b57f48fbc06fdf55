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


@dataclass(frozen=True)
class Probe:
    """One fixed-rate run of the search and its judgment."""

    qps: float
    status: str  # PASS, FAIL, INCONCLUSIVE or INVALID (see the module docstring)
    why: str  # in words, when not PASS
    checks: tuple[Check, ...]  # its SLO, failed-request and validity checks
    result: RunResult
    seconds: float  # wall time the probe took

    def to_json(self) -> dict[str, Any]:
        r = self.result
        slos = {c.metric: _slo_json(c) for c in self.checks if c.kind == "slo"}
        return {
            "qps": self.qps,
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

    scenario: str
    slos: dict[str, float]  # SLO keyword -> limit in ms
    saturation_qps: float  # the Offline estimate the search started from
    probes: tuple[Probe, ...]
    floors: tuple[float, ...]  # the rates probed whatever the search did (min_qps)
    tolerance: float
    budget_s: float
    seconds: float  # the whole search, the Offline estimate included
    stopped: str  # converged, budget, no passing rate, most probes
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_qps(self) -> float | None:
        """The highest rate whose probe passed with no probe at or below it failing by an
        observed percentile (a pass above a proven miss is noise, not capacity)."""
        return bracket(self.probes)[0]

    @property
    def last_pass_qps(self) -> float | None:
        return self.max_qps

    @property
    def first_fail_qps(self) -> float | None:
        """The lowest probed rate above `max_qps` that did not pass (its status says how)."""
        return bracket(self.probes)[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "offline-bracketed bisection on the request rate",
            "scenario": self.scenario,
            "slos_ms": dict(self.slos),
            "saturation_qps": self.saturation_qps,
            "max_qps": self.max_qps,
            "last_pass_qps": self.last_pass_qps,
            "first_fail_qps": self.first_fail_qps,
            "floors_qps": list(self.floors),
            "tolerance": self.tolerance,
            "budget_s": self.budget_s,
            "seconds": self.seconds,
            "stopped": self.stopped,
            "probes": [p.to_json() for p in self.probes],
        }


def bracket(probes: Sequence[Probe]) -> tuple[float | None, float | None]:
    """(highest passing rate not above a failed one, lowest rate above it that did not pass)."""
    failed = [p.qps for p in probes if p.status == "FAIL"]
    lowest_fail = min(failed, default=math.inf)
    passed = [p.qps for p in probes if p.status == "PASS" and p.qps < lowest_fail]
    low = max(passed, default=None)
    above = [p.qps for p in probes if p.status != "PASS" and (low is None or p.qps > low)]
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
    qps = float(result.qps or 0.0)
    slo = verdict.slo_checks(result, slos)
    failed = verdict.failure_check(result)
    around = verdict.validity_checks(result, busy=busy, throttled=throttled, sustain=False)
    checks = (failed, *slo, *around)
    invalid = [c.detail for c in around if c.status == "INVALID"]
    if invalid:
        return Probe(qps, "INVALID", "; ".join(invalid), checks, result, seconds)
    missed = [_miss(c) for c in slo if c.status == "FAIL"]
    if failed.status == "FAIL":
        missed.insert(0, f"{result.failed:,} of {result.requests:,} requests failed")
    if missed:
        return Probe(qps, "FAIL", "; ".join(missed), checks, result, seconds)
    client = set(verdict.run_validity(result, sustain=False))
    behind = [why for why in verdict.run_validity(result) if why not in client]
    drift = rising(result, slos)
    short = verdict.duration_check(result)
    unmet = [verdict.slo_reason(c) for c in slo if c.status != "PASS"]
    why = [*behind, *drift, *([short.detail] if short else []), *unmet]
    if why:
        return Probe(qps, "INCONCLUSIVE", "; ".join(why), checks, result, seconds)
    return Probe(qps, "PASS", "", checks, result, seconds)


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
) -> tuple[tuple[Probe, ...], str]:
    """Offline-bracketed bisection (module docstring): the probes in the order made, and
    why the search stopped. The floors are probed first whatever the budget; a later
    probe is made only while the time spent plus the longest probe so far fits."""
    start = clock()
    probes = [probe(rate) for rate in sorted(set(floors))]
    while True:
        low, high = bracket(probes)
        if low is not None and high is not None and high - low <= tolerance * low:
            return tuple(probes), "converged"
        if low is None and high is not None and high <= saturation * LEAST_SHARE:
            return tuple(probes), "no passing rate"
        if len(probes) >= MOST_PROBES:
            return tuple(probes), "most probes"
        longest = max((p.seconds for p in probes), default=0.0)
        if clock() - start + longest > budget_s:
            return tuple(probes), "budget"
        if high is None:
            rate = saturation if low is None or low < saturation else low * GROW
        elif low is None:
            rate = high / 2 if high <= saturation else saturation
        else:
            rate = (low + high) / 2
        probes.append(probe(rate))


def floor_check(found: Capacity, min_qps: float) -> Check:
    """The capacity_floor verdict: FAIL when the probe at `min_qps` missed an SLO by its
    observed percentile (or failed requests); else PASS when a probe at or above it met
    every SLO; else INVALID when the floor's probe could not be issued; else INCONCLUSIVE."""
    at = [p for p in found.probes if math.isclose(p.qps, min_qps)]
    passed = [p for p in found.probes if p.qps >= min_qps and p.status == "PASS"]
    cap = found.max_qps
    said = (
        f"capacity {_qps(cap)} requests/s (last pass {_qps(found.last_pass_qps)}, first "
        f"fail {_qps(found.first_fail_qps)}; {len(found.probes)} probes in "
        f"{found.seconds:,.0f} s, stopped: {found.stopped}; Offline saturation "
        f"{_qps(found.saturation_qps)} requests/s)"
    )
    floor = f"capacity floor {min_qps:,.4g} requests/s"
    numbers = {"observed": cap, "limit": min_qps}
    if not at:
        why = f"{floor}: no probe was made at the floor; {said}"
        return verdict.check("min_qps", "INCONCLUSIVE", "capacity", why, **numbers)
    probe = at[0]
    if probe.status == "FAIL":
        why = f"{floor} not served: the probe at the floor missed: {probe.why}; {said}"
        return verdict.check("min_qps", "FAIL", "capacity", why, **numbers)
    if passed:
        best = max(p.qps for p in passed)
        why = f"{floor} met: the probe at {best:,.4g} requests/s met every SLO; {said}"
        return verdict.check("min_qps", "PASS", "capacity", why, **numbers)
    status = "INVALID" if probe.status == "INVALID" else "INCONCLUSIVE"
    why = f"{floor}: the probe at the floor was {probe.status}: {probe.why}; {said}"
    return verdict.check("min_qps", status, "capacity", why, **numbers)


def _qps(value: float | None) -> str:
    return "none" if value is None else f"{value:,.4g}"
