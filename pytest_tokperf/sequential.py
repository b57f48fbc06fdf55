"""When a run bounded by `max_duration_s` may stop early: when every check is decided.

Looks at 1/16, 1/8, 1/4 and 1/2 of the maximum (and the end); those due before the run's
minimum (`min_duration_s`: the profile's, 600 s on the GPU profiles) are not taken, and
the confidence is shared (Bonferroni) among the looks that are. At a look the run stops
when the floors are decided on a steady rate (judged on the tail after a change, as the
final verdict is; a change without enough tail is not decided), every SLO is accepted by
LoadGen's early-stopping rule at the look's share of its 99%, and the comparison with
the baseline, when there is one, is decided too. A floor that FAILs decisively stops the
run at once: its test fails whatever the rest say. An SLO is never failed at a look: its
observed percentile on a few requests is noisy, and the final verdict decides it.

Doubling intervals keep the number of looks (and so the price paid in confidence per
look) small while a clear case still stops at 1/16 of the maximum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pytest_tokperf import early_stopping, metrics, regression, slo, verdict
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.metrics import PERCENTILES, output_tokens_per_s

# a baseline to decide against: (its stored payload, metric -> allowed change)
Baseline = tuple[Mapping[str, Any], Mapping[str, float]]


class Sequential:
    FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)

    def __init__(
        self,
        max_duration_s: float,
        floors: Mapping[str, float],
        devices: int,
        confidence: float,
        *,
        slos: Mapping[str, float] | None = None,
        min_duration_s: float = 0.0,
        baseline: Baseline | None = None,
        scenario: str = "concurrency",
    ) -> None:
        # the looks the minimum leaves (one before it would see the fresh start only)
        self.times = [t for f in self.FRACTIONS if (t := max_duration_s * f) >= min_duration_s]
        self.floors = dict(floors)
        self.slos = dict(slos or {})
        self.devices = devices
        self.confidence = confidence
        self.min_duration_s = min_duration_s
        self.baseline = baseline
        self.scenario = scenario
        self.looks = len(self.times) + 1  # the end of the run is the last look
        self.next = 0
        self.decided_at: float | None = None

    @property
    def per_look(self) -> float:
        return verdict.per_look(self.confidence, self.looks)

    def __call__(self, records: Sequence[RequestRecord], elapsed_s: float) -> bool:
        if self.next >= len(self.times) or elapsed_s < self.times[self.next]:
            return False
        while self.next < len(self.times) and elapsed_s >= self.times[self.next]:
            self.next += 1  # a look skipped (too early to count) spends no confidence
        if not (self.floors or self.slos or self.baseline):
            return False  # nothing to decide
        if any(r.error is not None for r in records):
            return False  # the verdict is already FAIL at the end
        statuses = self._floors(records) + self._slos(records) + self._regression(records)
        if "FAIL" in statuses or all(s in ("PASS", "IMPROVED") for s in statuses):
            self.decided_at = elapsed_s
            return True
        return False

    def _floors(self, records: Sequence[RequestRecord]) -> list[str]:
        if not self.floors:
            return []
        rate = output_tokens_per_s(records)
        observed = {"min_tokens_per_s": rate, "per_gpu": rate / self.devices}
        checks = verdict.floor_checks(records, observed, self.floors, self.devices, self.per_look)
        result = metrics.summarize(
            records, EngineInfo("-", "-", "-", self.devices), scenario=self.scenario,
            workload="-", max_tokens=None,
        )  # fmt: skip
        steady = verdict.steady_checks(result, checks, self.floors, {}, self.per_look)
        return [c.status for c in steady]

    def _slos(self, records: Sequence[RequestRecord]) -> list[str]:
        """PASS where LoadGen's rule accepts the percentile at the look's confidence."""
        out = []
        share = 1 - (1 - slo.EARLY_STOPPING_CONFIDENCE) / self.looks
        for key, limit_ms in self.slos.items():
            metric, pct = slo.slo_parts(key)
            values, failed = slo.slo_samples(records, metric)
            over = failed + sum(1 for v in values if v * 1000 > limit_ms)
            count = len(records) if metric == "itl" else len(values) + failed
            need = early_stopping.needed(over, PERCENTILES[pct], share)
            enough = count >= max(need, slo.samples_needed(PERCENTILES[pct], share))
            out.append("PASS" if enough else "UNDECIDED")
        return out

    def _regression(self, records: Sequence[RequestRecord]) -> list[str]:
        if self.baseline is None:
            return []
        stored, tolerances = self.baseline
        now = max(r.end_ns for r in records)
        current = {
            "windows_per_s": metrics.window_rates(records, metrics.BATCHES, now),
            regression.THROUGHPUT: output_tokens_per_s(records),
            "latencies_ms": {
                "ttft": [v * 1000 for r in records if (v := metrics.ttft_s(r)) is not None],
                "tpot": [v * 1000 for r in records if (v := metrics.tpot_s(r)) is not None],
                "e2e": [metrics.e2e_s(r) * 1000 for r in records if r.ok],
            },
        }
        checks = regression.compare(current, stored, tolerances, self.per_look)
        return [c.status for c in checks]
