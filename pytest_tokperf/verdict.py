"""Compare a run's numbers with its floors: PASS or FAIL, check by check.

Formatting the message a person reads is `report`'s job; this module only decides.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from pytest_tokperf.metrics import RunResult

# marker keyword -> (RunResult attribute, what it measures)
FLOOR_METRICS: dict[str, tuple[str, str]] = {
    "min_tokens_per_s": ("tokens_per_s", "output tokens/s"),
    "per_gpu": ("tokens_per_s_per_gpu", "output tokens/s per device"),
}

Bound = float | dict[str, float]


@dataclass(frozen=True)
class Check:
    metric: str  # marker keyword, e.g. "per_gpu", or "failed_requests"
    observed: float
    limit: float
    passed: bool


@dataclass(frozen=True)
class Verdict:
    status: str  # "PASS" or "FAIL"
    checks: tuple[Check, ...]

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise pytest.UsageError(f"{where}: expected a number, got {value!r}")
    if not value > 0:
        raise pytest.UsageError(f"{where}: a floor must be a positive number, got {value!r}")
    return float(value)


def parse_floor_marker(
    args: Sequence[object], kwargs: Mapping[str, object], where: str, profiles: Collection[str]
) -> dict[str, Bound]:
    """Validate `throughput_floor(...)` arguments; `where` names the test for errors."""
    usage = f"{where}: throughput_floor takes keywords {', '.join(FLOOR_METRICS)}"
    if args:
        raise pytest.UsageError(f"{usage}; got positional arguments {list(args)!r}")
    unknown = sorted(set(kwargs) - set(FLOOR_METRICS))
    if unknown:
        raise pytest.UsageError(f"{usage}; got unknown keywords {', '.join(unknown)}")
    bounds: dict[str, Bound] = {}
    for key, value in kwargs.items():
        if value is None:
            continue
        if isinstance(value, dict):
            bad = sorted(str(k) for k in value if k not in profiles)
            if bad:
                raise pytest.UsageError(
                    f"{where}: throughput_floor({key}=...) names unknown profiles "
                    f"{', '.join(bad)}; known profiles: {', '.join(sorted(profiles))}"
                )
            bounds[key] = {k: _number(v, f"{where}: {key}[{k!r}]") for k, v in value.items()}
        else:
            bounds[key] = _number(value, f"{where}: {key}")
    return bounds


def floors_for(
    bounds: Mapping[str, Bound], profile: str, defaults: Mapping[str, float]
) -> dict[str, float] | str:
    """The floors that apply under `profile`, or the reason the test must skip.

    A marker without bounds takes the profile's default floors.
    """
    if not bounds:
        return dict(defaults)
    floors: dict[str, float] = {}
    for key, bound in bounds.items():
        if isinstance(bound, dict):
            if profile not in bound:
                return (
                    f"throughput_floor({key}=...) sets no floor for profile {profile!r} "
                    f"(it has {', '.join(sorted(bound))})"
                )
            floors[key] = bound[profile]
        else:
            floors[key] = bound
    return floors


def judge(result: RunResult, floors: Mapping[str, float]) -> Verdict:
    """PASS when no request failed and every floor is reached."""
    checks = [Check("failed_requests", result.failed, 0, result.failed == 0)]
    for key, floor in floors.items():
        observed: Any = getattr(result, FLOOR_METRICS[key][0])
        checks.append(Check(key, float(observed), floor, observed >= floor))
    status = "PASS" if all(c.passed for c in checks) else "FAIL"
    return Verdict(status, tuple(checks))
