"""Compare a run's numbers with its floors and SLOs: PASS, FAIL, INCONCLUSIVE or INVALID.

Formatting the message a person reads is `report`'s job; this module only decides.

- Floors are judged on a confidence interval of the throughput (batch means over time
  windows, `metrics.throughput_interval`): PASS when the lower bound clears the floor,
  FAIL when the upper bound is below it, INCONCLUSIVE when the interval straddles it.
  The interval needs enough independent batches (`metrics.batch_rates`); without
  them the verdict is INCONCLUSIVE.
- SLOs are judged as LoadGen judges a Server run (`slo`).
- Validity is decided apart from both: a run whose driver fell behind its schedule,
  whose engine did not sustain the offered load or whose client saturated is
  INVALID, never PASS.

Every source of evidence is a `Check` of one shape, and `decide` alone turns a test's
checks into its status (`judgment`, whose names this module passes on, as it passes on
`slo`'s that other modules read here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_tokperf import accuracy, cache, server_metrics, steady
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.judgment import PASSING
from pytest_tokperf.judgment import Check as Check
from pytest_tokperf.judgment import Verdict as Verdict
from pytest_tokperf.judgment import check as check
from pytest_tokperf.judgment import decide as decide
from pytest_tokperf.judgment import verdict_of as verdict_of
from pytest_tokperf.metrics import (
    BATCHES,
    MIN_BATCHES,
    Batches,
    Interval,
    RunResult,
    batch_means,
    batch_rates,
    e2e_s,
    interval_of,
    itl_s,
    tpot_s,
    ttft_s,
    window_rates,
)
from pytest_tokperf.slo import SLO_METRICS as SLO_METRICS
from pytest_tokperf.slo import per_request_limits as per_request_limits
from pytest_tokperf.slo import samples_needed as samples_needed
from pytest_tokperf.slo import samples_word as samples_word
from pytest_tokperf.slo import slo_checks as slo_checks
from pytest_tokperf.slo import slo_parts as slo_parts
from pytest_tokperf.slo import slo_reason as slo_reason

# marker keyword -> (RunResult attribute, what it measures)
FLOOR_METRICS: dict[str, tuple[str, str]] = {
    "min_tokens_per_s": ("tokens_per_s", "output tokens/s"),
    "per_gpu": ("tokens_per_s_per_gpu", "output tokens/s per device"),
}
# schedule lag tolerance: this share of the mean gap between arrivals, at least LAG_MIN_S
LAG_SHARE = 0.1
LAG_MIN_S = 0.010
ACHIEVED_SHARE = 0.9  # the engine must complete at least 90% of the schedule's rate
CLIENT_CPU_MAX = 0.9  # driver thread CPU time / wall time above this: the client saturated
CLIENT_CPU_MIN_S = 1.0  # runs shorter than this are not judged for client saturation

Bound = float | dict[str, float]


def finite(value: object) -> float | None:
    """`value` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not abs(value) < 1e308:  # inf, nan, or an int too big for a float
        return None
    return float(value)


def floors_for(
    bounds: Mapping[str, Bound],
    profile: str,
    defaults: Mapping[str, float],
    marker: str = "throughput_floor",
) -> dict[str, float] | str:
    """The bounds that apply under `profile`, or the reason the test must skip.

    A marker without bounds takes the profile's defaults.
    """
    if not bounds:
        return dict(defaults)
    floors: dict[str, float] = {}
    for key, bound in bounds.items():
        if isinstance(bound, dict):
            if profile not in bound:
                word = "floor" if marker == "throughput_floor" else "limit"
                return (
                    f"{marker}({key}=...) sets no {word} for profile {profile!r} "
                    f"(it has {', '.join(sorted(bound))})"
                )
            floors[key] = bound[profile]
        else:
            floors[key] = bound
    return floors


def floor_status(interval: Interval | None, observed: float, floor: float) -> str:
    """PASS when the interval clears the floor, FAIL when it lies below, else INCONCLUSIVE.

    Without an interval (too few independent batches) nothing is decided.
    """
    if interval is None:
        return "INCONCLUSIVE"
    if interval.low >= floor:
        return "PASS"
    if interval.high < floor:
        return "FAIL"
    return "INCONCLUSIVE"


def per_look(confidence: float, looks: int) -> float:
    """Bonferroni: each of `looks` looks at 1 - (1 - confidence) / looks, so the chance
    of any wrong decisive verdict over the whole sequence stays below 1 - confidence."""
    return 1 - (1 - confidence) / max(1, looks)


def floor_checks(
    records: Sequence[RequestRecord],
    observed: Mapping[str, float],
    floors: Mapping[str, float],
    devices: int,
    confidence: float,
    end_ns: int | None = None,
    scenario: str = "server",
) -> list[Check]:
    """One check per floor, each with its interval (per-GPU floors scale it by devices).

    An Offline run's fixed workload is cut into `BATCHES` equal windows; a run over
    time gets `metrics.batch_rates` (ramp left out, long uncorrelated windows).
    """
    detail = ""
    if scenario == "offline":
        rates = window_rates(records, BATCHES, end_ns)
        interval = batch_means(rates, confidence)
        if len(records) < BATCHES:  # windows of fewer requests than windows: one stream cut up
            interval = None
            detail = (
                f"{len(records):,} request{'' if len(records) == 1 else 's'} cannot make "
                f"{BATCHES} independent batch windows: at least {BATCHES} needed"
            )
    else:
        batches = batch_rates(records, end_ns)
        rates = list(batches.rates)
        interval = interval_of(batches, confidence)
    return _against(floors, observed, interval, devices, confidence, len(rates), detail)


def _against(
    floors: Mapping[str, float],
    observed: Mapping[str, float],
    interval: Interval | None,
    devices: int,
    confidence: float,
    batches: int,
    detail: str,
) -> list[Check]:
    """Each floor against the throughput interval (per GPU: scaled by the devices)."""
    checks = []
    for key, floor in floors.items():
        scale = 1 / devices if key == "per_gpu" else 1.0
        iv = (
            None
            if interval is None
            else Interval(
                interval.estimate * scale,
                interval.low * scale,
                interval.high * scale,
                interval.confidence,
                interval.batches,
            )
        )
        status = floor_status(iv, observed[key], floor)
        checks.append(
            check(
                key,
                status,
                "floor",
                detail,
                observed=observed[key],
                limit=floor,
                ci_low=None if iv is None else iv.low,
                ci_high=None if iv is None else iv.high,
                confidence=confidence,
                batches=batches,
            )
        )
    return checks


def steady_checks(
    result: RunResult,
    floor_checks_: list[Check],
    floors: Mapping[str, float],
    slos: Mapping[str, float],
    confidence: float,
) -> list[Check]:
    """The floors' checks, or their steady tail's, and an INVALID check per change.

    When the rate changed for good (`steady.rate_change`) and the tail after the
    change has enough windows for an interval, the floors are judged on that tail
    alone; without enough tail, the run is INVALID (not steady). A latency with an
    SLO that moved between the run's first and last thirds is INVALID too.
    """
    out = list(floor_checks_)
    records, end = result.records, result.window_end_ns
    change = steady.rate_change(records, end, result.scenario) if floors else None
    if change is not None:
        moved = (
            f"the rate {'fell' if change.fell else 'rose'} from {change.before:,.0f} to "
            f"{change.after:,.0f} tokens/s at {change.at_s:,.1f} s"
        )
        tail = steady.tail_batches(records, change)
        interval = interval_of(tail, confidence)
        if interval is None:
            few = (
                f"too few to judge on (at least {MIN_BATCHES})"
                if len(tail.rates) < MIN_BATCHES
                else "too correlated to judge on"
            )
            why = (
                f"{moved}: not steady, and the {len(tail.rates)} windows after the change are "
                f"{few}; run longer"
            )
            out.append(check("steady_rate", "INVALID", "validity", why))
        else:
            tails = _part(result, floors, tail, interval, confidence)
            if change.fell:  # the part before cannot make a slower tail pass
                heads: list[Check | None] = [None] * len(tails)
                parts = " and on the whole run"
            else:
                head = steady.head_batches(records, change)
                heads = list(_part(result, floors, head, interval_of(head, confidence), confidence))
                parts = ", on the part before it and on the whole run"
            detail = f"judged on the tail after {change.at_s:,.1f} s{parts} ({moved})"
            out = [
                dataclasses.replace(_both(w, t, h), detail=detail)
                for w, t, h in zip(out, tails, heads, strict=True)
            ]
    for key in slos:
        metric, _ = slo_parts(key)
        moved_latency = steady.latency_change(records, _LATENCY[metric])
        if moved_latency is not None:
            why = (
                f"{SLO_METRICS[metric]} {'fell' if moved_latency.fell else 'rose'} from a median "
                f"of {moved_latency.before * 1000:,.1f} ms in the run's first third to "
                f"{moved_latency.after * 1000:,.1f} ms in its last: not steady"
            )
            out.append(check(f"steady_{metric}", "INVALID", "validity", why))
    return out


_WORSE = ("FAIL", "INVALID", "INCONCLUSIVE", "PASS")


def _part(
    result: RunResult,
    floors: Mapping[str, float],
    batches: Batches,
    interval: Interval | None,
    confidence: float,
) -> list[Check]:
    """The floors judged on one part of a run whose rate changed (its batches only)."""
    rate = interval.estimate if interval is not None else 0.0
    devices = result.engine.devices
    observed = {"min_tokens_per_s": rate, "per_gpu": rate / devices}
    return _against(floors, observed, interval, devices, confidence, len(batches.rates), "")


def _both(whole: Check, tail: Check, head: Check | None) -> Check:
    """A floor judged on a run whose rate changed: the tail's numbers, and a status from
    the tail and the rest. After a fall (a GPU that throttled) the slower tail is the
    engine from now on: the worse of the tail and the whole run counts. After a rise the
    faster tail may be a fast phase rather than the end of a warm-up: a verdict counts
    when the tail and either the whole run or the slower part before the change agree
    on it (both parts passing, the engine passes at either speed; the whole run rarely
    has an interval of its own, its windows correlated by the very change); INVALID
    where the tail and the whole run contradict each other, else INCONCLUSIVE."""
    if head is None:  # a fall
        status = min({whole.status, tail.status}, key=_WORSE.index)
    elif tail.status in ("PASS", "FAIL") and tail.status in (whole.status, head.status):
        status = tail.status
    elif {tail.status, whole.status} == {"PASS", "FAIL"}:
        status = "INVALID"
    else:
        status = "INCONCLUSIVE"
    return dataclasses.replace(tail, status=status, passed=status in PASSING)


def _worst_gap(record: RequestRecord) -> float | None:
    gaps = itl_s(record)
    return max(gaps) if gaps else None


_LATENCY = {"ttft": ttft_s, "tpot": tpot_s, "e2e": e2e_s, "itl": _worst_gap}


def _observed(result: RunResult, key: str) -> float:
    value: Any = getattr(result, FLOOR_METRICS[key][0])
    return float(value)


def run_validity(result: RunResult, *, sustain: bool = True) -> tuple[str, ...]:
    """Why the run's measurement cannot be trusted, if it cannot; empty when it can.

    Without `sustain`, an engine that did not keep up with the schedule is left out: a
    capacity probe above the capacity is expected to fall behind (`capacity`)."""
    reasons = []
    if result.scheduled_qps is not None:
        tolerance = max(LAG_MIN_S, LAG_SHARE / result.scheduled_qps)
        lag = result.lag.p99
        traced = result.scenario == "trace"
        if lag is not None and lag > tolerance:
            reasons.append(
                f"the driver fell behind its {'trace' if traced else 'seeded'} arrival "
                f"schedule: p99 issue lag {lag * 1000:,.1f} ms > tolerance "
                f"{tolerance * 1000:,.1f} ms"
            )
        achieved = result.achieved_qps or 0.0
        if sustain and achieved < ACHIEVED_SHARE * result.scheduled_qps:
            target, fix = (
                ("the trace's rate", "lower trace_speed") if traced
                else (f"target qps {result.qps:g}", "lower qps")
            )  # fmt: skip
            reasons.append(
                f"the engine did not sustain the offered load: it completed "
                f"{achieved:,.2f} requests/s < {ACHIEVED_SHARE:.0%} of the schedule's "
                f"{result.scheduled_qps:,.2f} ({target}); {fix}"
            )
    # a CPU share over a blink (a run whose requests all failed at once) is start-up noise
    timed = result.duration_s >= CLIENT_CPU_MIN_S
    if timed and result.client_cpu is not None and result.client_cpu > CLIENT_CPU_MAX:
        reasons.append(
            f"the client saturated: the driver thread used {result.client_cpu:.0%} of a "
            "core over the run, so the load generator, not the engine, was measured"
        )
    for proc in result.client_procs:
        if timed and proc.cpu is not None and proc.cpu > CLIENT_CPU_MAX:
            reasons.append(
                f"the client saturated: client process {proc.index} of "
                f"{len(result.client_procs)} (pid {proc.pid}) used {proc.cpu:.0%} of a core "
                "over the run; add client processes (--tokperf-client-procs)"
            )
    server = server_metrics.disagreement(result.server)
    if server is not None:
        reasons.append(server)
    band = cache.band_reason(result.cache)
    if band is not None:
        reasons.append(band)
    return tuple(reasons)


def failure_check(result: RunResult, run: int | None = None, runs: int = 1) -> Check:
    """FAIL when more requests failed than the run allowed (`allow_failures`, default
    none): a failed request, or an engine that died, is never a pass."""
    allowed = result.allowed_failures
    return check(
        "failed_requests",
        "FAIL" if result.failed > allowed else "PASS",
        "requests",
        observed=result.failed,
        limit=allowed,
        count=result.requests,
        run=run,
        runs=runs,
    )


POLICIES = ("invalid", "note")


def validity_checks(
    result: RunResult, *, busy: str = "invalid", throttled: str = "note", sustain: bool = True
) -> list[Check]:
    """One INVALID check per reason the run's measurement cannot be trusted; and the
    run's surroundings, INVALID or a note (a passing check that says so) by policy: a
    busy machine (`busy`, --tokperf-busy-machine), GPUs that slowed their clocks
    (`throttled`, the profile's); another process's work on the run's GPUs is INVALID."""
    reasons = run_validity(result, sustain=sustain)
    out = [check("validity", "INVALID", "validity", why) for why in reasons]
    telemetry = result.telemetry
    if telemetry is None:
        return out
    cpu, gpu = telemetry.cpu, telemetry.gpu
    if cpu.busy_machine:
        stolen = f" (and the hypervisor {cpu.steal_cores:.1f})" if cpu.steal_cores else ""
        load = "" if cpu.load_1m is None else f", load {cpu.load_1m:.1f}"
        why = (
            f"the machine was busy: other processes kept {cpu.others_cores:.1f} of its "
            f"{cpu.machine_cores} cores busy during the run{stolen}{load}: the engine's numbers "
            "are partly theirs; run on an idle machine"
        )
        status = "INVALID" if busy == "invalid" else "PASS"
        out.append(check("busy_machine", status, "validity", why))
    if gpu is not None and gpu.throttled:
        why = f"the GPUs slowed their clocks during the run ({', '.join(gpu.throttle_reasons)})"
        status = "INVALID" if throttled == "invalid" else "PASS"
        out.append(check("throttled", status, "validity", why))
    if gpu is not None and gpu.cotenants:
        pids = ", ".join(str(p) for p in gpu.cotenants)
        why = (
            f"other processes ran compute work on the run's GPUs (pid {pids}): a co-tenant "
            "shared them, so the engine's numbers are not its own"
        )
        out.append(check("gpu_cotenants", "INVALID", "validity", why))
    return out


def parity_checks(result: accuracy.ParityResult, run: int | None = None) -> list[Check]:
    """A parity result's gated metrics as checks, and one saying so when it has fewer
    samples than `accuracy.MIN_SAMPLES` (its intervals then decide nothing)."""
    n = len(result.samples)
    out = [
        check(
            c.metric,
            c.status,
            "parity",
            observed=c.observed,
            limit=c.minimum if c.minimum is not None else c.maximum,
            ci_low=c.low,
            ci_high=c.high,
            confidence=accuracy.CONFIDENCE,
            run=run,
            count=n,
        )
        for c in result.checks
    ]
    if n < accuracy.MIN_SAMPLES:
        why = (
            f"accuracy parity on {n} sample{'' if n == 1 else 's'}: at least "
            f"{accuracy.MIN_SAMPLES} needed before a bootstrap interval decides anything"
        )
        evidence = check("parity_samples", "INCONCLUSIVE", "evidence", why, observed=n, run=run)
        out.append(dataclasses.replace(evidence, limit=accuracy.MIN_SAMPLES))
    return out


def validity(result: RunResult, slos: Mapping[str, float]) -> tuple[str, ...]:
    """Why the measurement cannot be trusted or the SLOs not be judged; empty when fine."""
    return verdict_of([*validity_checks(result), *slo_checks(result, slos)]).invalid


def duration_check(result: RunResult) -> Check | None:
    """INCONCLUSIVE when a run that judges floors or SLOs ended before the least it had
    to last (the profile's `min_duration_s`, MLPerf's 600 s on the GPU profiles): an
    engine's slow side (heat, throttling, a filling cache, a neighbour) takes time to
    show, so such a run cannot PASS. A decisive FAIL stays a FAIL: turning it into
    INCONCLUSIVE would let --tokperf-inconclusive=pass pass an engine far below its floor."""
    least = result.min_duration_s
    if result.duration_s >= least:
        return None
    why = (
        f"the run lasted {result.duration_s:,.1f} s, shorter than the {least:,.0f} s a "
        "judged run must last (the profile's min_duration_s; set it with "
        "--tokperf-min-duration or tokperf.run(min_duration_s=...)): an engine's slow side "
        "(heat, throttling, a filling cache) may not have shown yet"
    )
    out = check("min_duration_s", "INCONCLUSIVE", "evidence", why, observed=result.duration_s)
    return dataclasses.replace(out, limit=least)


def judge(
    result: RunResult,
    floors: Mapping[str, float],
    slos: Mapping[str, float] | None = None,
    *,
    confidence: float = 0.95,
    looks: int = 1,
    busy: str = "invalid",
    throttled: str = "note",
) -> Verdict:
    """The verdict of one run against its floors and SLOs: its checks (failed requests,
    each floor, each SLO, validity, the run's length), decided by `decide`."""
    observed = {key: _observed(result, key) for key in floors}
    confidence_per_look = per_look(confidence, looks)
    floor = floor_checks(
        result.records,
        observed,
        floors,
        result.engine.devices,
        confidence_per_look,
        result.window_end_ns,
        result.scenario,
    )
    checks = [
        failure_check(result),
        *steady_checks(result, floor, floors, slos or {}, confidence_per_look),
        *slo_checks(result, slos or {}),
        *validity_checks(result, busy=busy, throttled=throttled),
    ]
    short = duration_check(result) if floors or slos else None
    return verdict_of([*checks, *([short] if short else [])], confidence, looks)
