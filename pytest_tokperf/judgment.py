"""The one shape of evidence and the one judgment: a `Check`, and `decide`.

Every source of evidence (failed requests, floors, SLOs, validity, too little
evidence, parity, regression, a missing baseline, the rack) is a `Check` of one shape,
and `decide` alone turns a test's checks into its status. Making the checks is
`verdict`'s job (and `slo`'s, `gate`'s, ...); this module only holds their shape and
ranks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STATUSES = ("PASS", "FAIL", "INCONCLUSIVE", "INVALID", "NOT MEASURED", "ACKNOWLEDGED")
PASSING = ("PASS", "ACKNOWLEDGED")
# kinds of check whose PASS makes a test PASS; the others (failed requests, validity,
# evidence) can only keep it from passing: a test with no gate is MEASURED
GATES = ("floor", "slo", "parity", "regression", "baseline", "rack", "node", "capacity", "goodput")


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
