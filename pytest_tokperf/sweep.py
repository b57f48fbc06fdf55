"""Sweeps: one measured run per load point (`tokperf.sweep(qps=[...])` or
`concurrency=[...]`), each judged against the test's SLOs, for the throughput-vs-latency
curve and the Pareto plot of the report (`figures`).

A point's status is `verdict.judge` of its run against the SLOs alone (no floors): the
one judging path, so a point marked as meeting the SLOs is one the gate would pass.
Output tokens/s per user is the median over completed requests of 1 / TPOT (tokens
after the first per second of decoding), what vLLM's `plot_pareto` and InferenceX
call interactivity; per GPU is the run's output tokens/s over the devices used.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from pytest_tokperf import slo, verdict
from pytest_tokperf.metrics import RunResult, tpot_s

if TYPE_CHECKING:
    from pytest_tokperf.runner import Tokperf

AXES = ("qps", "concurrency")


def per_user(result: RunResult) -> float | None:
    """Median over completed requests of 1 / TPOT (tokens/s one user sees while decoding);
    None when no request had two tokens."""
    rates = [1 / t for r in result.records if r.ok and (t := tpot_s(r)) is not None and t > 0]
    return statistics.median(rates) if rates else None


@dataclass(frozen=True)
class Sweep(Sequence[RunResult]):
    """The runs of a sweep, one per load point, in the order given."""

    axis: str  # qps or concurrency
    scenario: str
    loads: tuple[float, ...]
    results: tuple[RunResult, ...]
    slos: dict[str, float] = field(default_factory=dict)  # ms, the test's for the scenario
    busy: str = "invalid"  # how a busy machine counts (--tokperf-busy-machine)
    throttled: str = "note"  # how slowed GPU clocks count (the profile's)

    @overload
    def __getitem__(self, i: int) -> RunResult: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[RunResult]: ...
    def __getitem__(self, i: int | slice) -> RunResult | Sequence[RunResult]:
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[RunResult]:
        return iter(self.results)

    def statuses(self) -> list[str]:
        """Each point's verdict against the SLOs alone (MEASURED without SLOs)."""
        return [
            verdict.judge(r, {}, self.slos, busy=self.busy, throttled=self.throttled).status
            for r in self.results
        ]

    def to_json(self, capacity_qps: float | None = None) -> dict[str, Any]:
        points = []
        limits = slo.per_request_limits(self.slos) if self.slos else None
        for load, r, status in zip(self.loads, self.results, self.statuses(), strict=True):
            points.append({
                self.axis: load,
                "status": status,
                "requests": r.requests,
                "failed": r.failed,
                "duration_s": r.duration_s,
                "requests_per_s": r.requests_per_s,
                "tokens_per_s": r.tokens_per_s,
                "tokens_per_s_per_gpu": r.tokens_per_s_per_gpu,
                "tokens_per_s_per_user": per_user(r),
                "goodput_tokens_per_s": None if limits is None else r.goodput_tokens(limits),
                "devices": r.engine.devices,
                **{f"{m}_{p}_ms": _ms(getattr(getattr(r, m), p))
                   for m in ("ttft", "tpot", "e2e") for p in ("p50", "p90", "p99")},
            })  # fmt: skip
        return {
            "axis": self.axis,
            "scenario": self.scenario,
            "slos_ms": dict(self.slos),
            "capacity_qps": capacity_qps,
            "points": points,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _loads(axis: str, values: object) -> tuple[float, ...]:
    call = f"tokperf.sweep({axis}=...)"
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{call}: expected a non-empty list of load points, got {values!r}")
    out: list[float] = []
    for v in values:
        number = verdict.finite(v)
        if number is None or number <= 0 or (axis == "concurrency" and not isinstance(v, int)):
            kind = "a positive integer" if axis == "concurrency" else "a positive number"
            raise ValueError(f"{call}: each point must be {kind}, got {v!r}")
        if number in out:
            raise ValueError(f"{call}: the point {v!r} is given twice")
        out.append(number)
    return tuple(out)


def sweep(
    runner: Tokperf,
    scenario: str | None = None,
    *,
    qps: Sequence[float] | None = None,
    concurrency: Sequence[int] | None = None,
    requests: int | None = None,
    max_tokens: int | None = None,
    workload: str | Path | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    warmup: int | None = None,
) -> Sweep:
    """One `runner.run` per point of `qps` (server or interactive) or `concurrency`."""
    if (qps is None) == (concurrency is None):
        raise ValueError("tokperf.sweep: give qps=[...] or concurrency=[...], one of them")
    axis = "qps" if qps is not None else "concurrency"
    loads = _loads(axis, qps if qps is not None else concurrency)
    allowed = ("server", "interactive") if axis == "qps" else ("concurrency",)
    scenario = scenario or allowed[0]
    if scenario not in allowed:
        raise ValueError(
            f"tokperf.sweep(scenario={scenario!r}): a {axis} sweep runs {' or '.join(allowed)}"
        )
    results = []
    for load in loads:
        given: dict[str, Any] = {"qps": load} if axis == "qps" else {"concurrency": int(load)}
        results.append(runner.run(scenario, requests, max_tokens, workload, seed=seed,
                                  warmup=warmup, duration_s=duration_s, **given))  # fmt: skip
    # the test's latency_slo limits, else its capacity_floor's: the limits to draw
    marker = runner.capacity_floor or {}
    slos = dict(runner.slos(scenario)) or {k: v for k, v in marker.items() if k in slo.SLO_KEYWORDS}
    found = Sweep(axis, scenario, loads, tuple(results), slos, runner.busy, runner.throttled)
    runner.sweeps.append(found)
    return found


def attach(data: dict[str, Any], runner: Tokperf) -> None:
    """The test's sweeps into its payload, the capacity found marked where one was."""
    if not runner.sweeps:
        return
    cap = runner.capacities[-1].max_qps if runner.capacities else None
    data["sweeps"] = [s.to_json(cap if s.axis == "qps" else None) for s in runner.sweeps]
