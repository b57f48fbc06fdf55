"""The goodput floor: `throughput_floor(min_goodput_tokens_per_s=...)`.

Goodput is the output tokens/s of the requests that met every SLO of the test's
`latency_slo` marker (vLLM's `--goodput`, AIPerf's goodput; `metrics.goodput_tokens`).
It is judged as the throughput floors are (`verdict.floor_checks`): on a confidence
interval of the rate by batch means over time windows, counting in each window only
the tokens of requests that met every SLO. PASS when the interval's low end clears
the floor, FAIL when its high end is below it, INCONCLUSIVE otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from pytest_tokperf import verdict
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.metrics import RunResult, meets
from pytest_tokperf.verdict import Check

KEY = "min_goodput_tokens_per_s"
MISSED = "missed an SLO (not goodput)"


def good_only(records: Sequence[RequestRecord], limits: Mapping[str, float]) -> list[RequestRecord]:
    """The records with every one that missed a limit marked failed: the floor's windows
    count completed requests' tokens only, so theirs drop out while the run's span and
    schedule stay as they were."""
    return [r if meets(r, limits) else dataclasses.replace(r, error=r.error or MISSED)
            for r in records]  # fmt: skip


def floor_check(
    result: RunResult, floor: float, slos: Mapping[str, float], confidence: float
) -> Check:
    """The goodput floor's check (module docstring); INVALID without SLOs to count by."""
    if not slos:
        why = (
            f"goodput floor {floor:,.0f} output tokens/s: the {result.scenario} run has no "
            "latency SLOs to count good requests by; add latency_slo(...) limits for it"
        )
        return verdict.check(KEY, "INVALID", "goodput", why, limit=floor)
    limits = verdict.per_request_limits(slos)
    observed = result.goodput_tokens(limits)
    (found,) = verdict.floor_checks(
        good_only(result.records, limits),
        {KEY: observed},
        {KEY: floor},
        result.engine.devices,
        confidence,
        result.window_end_ns,
        result.scenario,
    )
    good = sum(1 for r in result.records if meets(r, limits))
    said = (
        f"{result.scenario} goodput {observed:,.1f} output tokens/s ({good:,} of "
        f"{len(result.records):,} requests met every SLO: {_limits(slos)})"
    )
    if found.ci_low is None:
        ci = f"no interval: {found.detail or f'{found.batches or 0} batch windows, at least 6'}"
    else:
        ci = f"{found.confidence:.1%} CI {max(0.0, found.ci_low):,.1f}-{found.ci_high:,.1f}"
    relation = {"PASS": ">=", "FAIL": "<"}.get(found.status, "straddles")
    why = f"{said} ({ci}) {relation} floor {floor:,.1f}"
    if found.status == "INCONCLUSIVE":
        why += "; a longer run narrows the interval"
    return dataclasses.replace(found, kind="goodput", detail=why)


def _limits(slos: Mapping[str, float]) -> str:
    return ", ".join(f"{key} {limit:,.0f}" for key, limit in slos.items())
