"""Compare a run's numbers with its floors and SLOs: PASS, FAIL, INCONCLUSIVE or INVALID.

Formatting the message a person reads is `report`'s job; this module only decides.

- Floors are judged on a confidence interval of the throughput (batch means over time
  windows, `metrics.throughput_interval`): PASS when the lower bound clears the floor,
  FAIL when the upper bound is below it, INCONCLUSIVE when the interval straddles it.
  The interval needs enough independent batches (`metrics.batch_rates`); without
  them the verdict is INCONCLUSIVE.
- SLOs are judged as LoadGen judges a Server run: PASS only when its early-stopping
  estimate accepts the percentile (few enough requests over the limit for their
  number, failed requests counting as over); FAIL when the observed percentile itself
  misses the limit; otherwise the run is INVALID (too few requests for what it saw).
- Validity is decided apart from both: a run whose driver fell behind its schedule,
  whose engine did not sustain the offered load or whose client saturated is
  INVALID, never PASS.

Every source of evidence (failed requests, floors, SLOs, validity, too little
evidence; and outside this module parity, regression, a missing baseline, the rack)
is a `Check` of one shape, and `decide` alone turns a test's checks into its status.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_tokperf import accuracy, cache, early_stopping, server_metrics, steady
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.metrics import (
    BATCHES,
    MIN_BATCHES,
    PERCENTILES,
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

# marker keyword -> (RunResult attribute, what it measures)
FLOOR_METRICS: dict[str, tuple[str, str]] = {
    "min_tokens_per_s": ("tokens_per_s", "output tokens/s"),
    "per_gpu": ("tokens_per_s_per_gpu", "output tokens/s per device"),
}
# latency_slo keywords: <metric>_<percentile>_ms, e.g. ttft_p99_ms
SLO_METRICS: dict[str, str] = {
    "ttft": "TTFT",
    "tpot": "TPOT",
    "itl": "ITL",
    "e2e": "E2E latency",
}
SLO_KEYWORDS: tuple[str, ...] = tuple(
    f"{m}_{p}_ms" for m in SLO_METRICS for p in PERCENTILES
)  # fmt: skip
_SLO_KEY = re.compile(r"^(?P<metric>[a-z0-9]+)_(?P<pct>p\d+)_ms$")

STATUSES = ("PASS", "FAIL", "INCONCLUSIVE", "INVALID", "NOT MEASURED", "ACKNOWLEDGED")
PASSING = ("PASS", "ACKNOWLEDGED")
# kinds of check whose PASS makes a test PASS; the others (failed requests, validity,
# evidence) can only keep it from passing: a test with no gate is MEASURED
GATES = ("floor", "slo", "parity", "regression", "baseline", "rack", "node", "capacity", "goodput")

# LoadGen's early-stopping estimate is taken at 99% confidence (mlcommons/inference,
# loadgen/early_stopping.cc)
EARLY_STOPPING_CONFIDENCE = early_stopping.CONFIDENCE
# schedule lag tolerance: this share of the mean gap between arrivals, at least LAG_MIN_S
LAG_SHARE = 0.1
LAG_MIN_S = 0.010
ACHIEVED_SHARE = 0.9  # the engine must complete at least 90% of the schedule's rate
CLIENT_CPU_MAX = 0.9  # driver thread CPU time / wall time above this: the client saturated
CLIENT_CPU_MIN_S = 1.0  # runs shorter than this are not judged for client saturation

Bound = float | dict[str, float]


@dataclass(frozen=True)
class Check:
    """One piece of evidence about a test, whatever its source (`kind`)."""

    metric: str  # marker keyword, e.g. "per_gpu", "ttft_p99_ms", or "failed_requests"
    observed: float | None  # None: a check that is not a number against a limit
    limit: float | None
    passed: bool  # status in PASSING
    status: str = ""  # one of STATUSES
    ci_low: float | None = None  # a floor's confidence interval, same unit as observed
    ci_high: float | None = None
    confidence: float | None = None  # of this interval (per look) or of the SLO estimate
    batches: int | None = None  # a floor's independent batches (< MIN_BATCHES: no interval)
    # an SLO: samples, how many over the limit (failed requests count), LoadGen's
    # early-stopping count needed with that many over, and its percentile estimate (ms)
    count: int | None = None
    over: int | None = None
    needed: int | None = None
    estimate: float | None = None
    # requests, floor, slo, validity, evidence, interrupted, parity, regression,
    # baseline, rack: where the evidence comes from
    kind: str = "floor"
    run: int | None = None  # the test's run it judges (0-based), for a test of several
    runs: int = 1  # how many runs the test made
    detail: str = ""  # why, in words, where the numbers alone do not say it


def check(metric: str, status: str, kind: str, detail: str = "", **numbers: Any) -> Check:
    """A check whose `passed` follows from its status."""
    numbers.setdefault("observed", None)
    numbers.setdefault("limit", None)
    return Check(
        metric=metric, passed=status in PASSING, status=status, kind=kind, detail=detail,
        **numbers,
    )  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    status: str  # decide(checks): PASS, FAIL, INCONCLUSIVE, INVALID, ACKNOWLEDGED, MEASURED
    checks: tuple[Check, ...]
    confidence: float = 0.95  # of the floors' intervals, over all looks of a run together
    looks: int = 1  # sequential looks the confidence was split over (Bonferroni)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed and c.status != "NOT MEASURED")

    @property
    def invalid(self) -> tuple[str, ...]:
        """Why the measurement is not valid, one reason each."""
        return tuple(c.detail for c in self.checks if c.status == "INVALID")


def decide(checks: Sequence[Check]) -> str:
    """A test's status from all its checks: the one judgment.

    In this order: INVALID when the run was cut (Ctrl-C: its unfinished requests are
    no failures of the engine); FAIL when a request failed or a rack's node failed or
    is missing (a fact about the engine, however the run was measured); INVALID when
    the measurement itself cannot be trusted (the driver fell behind, the client
    saturated: its other numbers do not count); FAIL when any other check failed;
    INVALID when a check has too little evidence to be judged at all (an SLO's
    early-stopping minimum); INCONCLUSIVE when a check could not decide; otherwise
    PASS (ACKNOWLEDGED when a regression passed only by an acknowledgement) if some
    gate passed, else MEASURED: nothing gated it.
    NOT MEASURED (a baseline allowed to be missing) neither fails nor passes a test.
    """

    def has(status: str, kinds: Sequence[str] | None = None) -> bool:
        return any(c.status == status and (kinds is None or c.kind in kinds) for c in checks)

    if has("INVALID", ("interrupted",)):
        return "INVALID"
    if has("FAIL", ("requests", "node")):
        return "FAIL"
    if has("INVALID", ("validity",)):
        return "INVALID"
    for status in ("FAIL", "INVALID", "INCONCLUSIVE"):
        if has(status):
            return status
    gates = [c for c in checks if c.kind in GATES and c.status in PASSING]
    if not gates:
        return "MEASURED"
    return "ACKNOWLEDGED" if any(c.status == "ACKNOWLEDGED" for c in gates) else "PASS"


def verdict_of(checks: Sequence[Check], confidence: float = 0.95, looks: int = 1) -> Verdict:
    return Verdict(decide(checks), tuple(checks), confidence, looks)


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


def slo_parts(key: str) -> tuple[str, str]:
    """ "ttft_p99_ms" -> ("ttft", "p99")."""
    match = _SLO_KEY.match(key)
    if match is None or match["metric"] not in SLO_METRICS or match["pct"] not in PERCENTILES:
        raise ValueError(f"not a latency_slo keyword: {key!r}")
    return match["metric"], match["pct"]


def per_request_limits(slos: Mapping[str, float]) -> dict[str, float]:
    """SLO limits in seconds per metric for goodput: the tightest of its percentiles."""
    limits: dict[str, float] = {}
    for key, limit_ms in slos.items():
        metric, _ = slo_parts(key)
        limits[metric] = min(limits.get(metric, math.inf), limit_ms / 1000)
    return limits


def samples_needed(p: float, confidence: float = EARLY_STOPPING_CONFIDENCE) -> int:
    """Fewest samples for which, with none over the limit, the p-th percentile is shown
    under it at `confidence`: LoadGen's early-stopping rule with zero overs.

    459 for p99 at 99% (as LoadGen computes it), 44 for p90.
    """
    return early_stopping.needed(0, p, confidence)


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


def slo_samples(records: Sequence[RequestRecord], metric: str) -> tuple[list[float], int]:
    """The metric's samples in seconds (from completed requests), and the failed
    requests, which count as over any limit."""
    ok = [r for r in records if r.ok]
    failed = len(records) - len(ok)
    if metric == "itl":
        return [v for r in ok for v in itl_s(r)], failed
    per_request = {"ttft": ttft_s, "tpot": tpot_s, "e2e": e2e_s}[metric]
    return [v for r in ok if (v := per_request(r)) is not None], failed


def slo_check(result: RunResult, key: str, limit_ms: float) -> Check:
    """PASS when LoadGen's early-stopping estimate accepts the percentile; FAIL when the
    observed percentile misses the limit; otherwise INVALID (see `slo_reason`)."""
    metric, pct = slo_parts(key)
    p = PERCENTILES[pct]
    values, failed = slo_samples(result.records, metric)
    observed = getattr(getattr(result, metric), pct)
    count = len(values) + failed
    over = failed + sum(1 for v in values if v * 1000 > limit_ms)
    needed = early_stopping.needed(over, p, EARLY_STOPPING_CONFIDENCE)
    estimate = early_stopping.estimate(
        [*values, *[math.inf] * failed], p, EARLY_STOPPING_CONFIDENCE
    )
    detail = ""
    if observed is not None and observed * 1000 > limit_ms:
        status = "FAIL"
    elif count >= needed:
        status = "PASS"
    else:
        status = "INVALID"  # also with no samples at all: nothing shows the limit is met
    requests = len(result.records)
    least = samples_needed(p)
    if metric == "itl" and status == "PASS" and requests < least:
        # a request's token gaps share its batch, its prompt and its neighbours: they
        # are not independent samples, so LoadGen's minimum counts requests
        status = "INVALID"
        detail = (
            f"ITL {pct}: {requests:,} request{'' if requests == 1 else 's'} ({count:,} token "
            f"gaps); the gaps of one request are not independent samples, so LoadGen's "
            f"early-stopping minimum counts requests: at least {least:,} requests to "
            f"accept {pct} at {EARLY_STOPPING_CONFIDENCE:.0%} confidence"
        )
    out = check(
        key,
        status,
        "slo",
        detail,
        observed=math.nan if observed is None else observed * 1000,
        limit=limit_ms,
        confidence=EARLY_STOPPING_CONFIDENCE,
        count=count,
        over=over,
        needed=needed,
        estimate=None if estimate is None or math.isinf(estimate) else estimate * 1000,
    )
    if status == "INVALID" and not detail:
        out = dataclasses.replace(out, detail=slo_reason(out))
    return out


def slo_checks(result: RunResult, slos: Mapping[str, float]) -> list[Check]:
    return [slo_check(result, key, limit_ms) for key, limit_ms in slos.items()]


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f} ms"


def samples_word(key: str) -> str:
    """What an SLO counts: requests, or for ITL the gaps between chunks."""
    return "token gaps" if slo_parts(key)[0] == "itl" else "requests"


def slo_reason(check: Check) -> str:
    """Why an SLO check that neither passed nor failed makes the run INVALID.

    "TTFT p99: 4 of 459 requests over 2,000 ms; LoadGen's early-stopping estimate needs
    at least 1,157 requests with 4 over (or fewer over) to accept p99 at 99% confidence"
    and then the observed percentile beside the estimate.
    """
    if check.detail:
        return check.detail
    metric, pct = slo_parts(check.metric)
    word = samples_word(check.metric)
    return (
        f"{SLO_METRICS[metric]} {pct}: {check.over:,} of {check.count:,} {word} over "
        f"{check.limit:,.0f} ms; LoadGen's early-stopping estimate needs at least "
        f"{check.needed:,} {word} with {check.over:,} over (or fewer over) to accept "
        f"{pct} at {EARLY_STOPPING_CONFIDENCE:.0%} confidence (observed {pct} "
        f"{_ms(check.observed)}, early-stopping estimate {_ms(check.estimate)})"
    )


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
