"""Judge a run's latency SLOs as LoadGen judges a Server run.

PASS only when its early-stopping estimate accepts the percentile (few enough requests
over the limit for their number, failed requests counting as over); FAIL when the
observed percentile itself misses the limit; otherwise the run is INVALID (too few
requests for what it saw). `verdict.judge` puts these checks beside the floors'.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from pytest_tokperf import early_stopping
from pytest_tokperf.judgment import Check, check
from pytest_tokperf.metrics import PERCENTILES, RunResult, e2e_s, itl_s, tpot_s, ttft_s
from pytest_tokperf.records import RequestRecord

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

# LoadGen's early-stopping estimate is taken at 99% confidence (mlcommons/inference,
# loadgen/early_stopping.cc)
EARLY_STOPPING_CONFIDENCE = early_stopping.CONFIDENCE


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
