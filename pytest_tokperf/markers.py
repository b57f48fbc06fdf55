"""The tokperf markers: their help texts and the parsers that validate their arguments.

Every parser raises `pytest.UsageError` naming the test and what a good value looks
like, so a typo in a marker stops the session before anything runs. The rules they
check (which keywords, which metrics) belong to the pure modules: `verdict`,
`accuracy` and `regression`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from pytest_tokperf import regression
from pytest_tokperf.accuracy import ParitySpec
from pytest_tokperf.goodput import KEY as GOODPUT
from pytest_tokperf.profiles import Profile
from pytest_tokperf.slo import SLO_KEYWORDS
from pytest_tokperf.verdict import FLOOR_METRICS, Bound, finite, floors_for

FLOOR_MARKER = (
    "throughput_floor(min_tokens_per_s=None, per_gpu=None, per_rack=None, "
    "min_goodput_tokens_per_s=None): fail the test unless its last tokperf run reaches "
    "these output tokens/s floors (per_rack: all MPI ranks together; goodput: tokens of "
    "requests that met every latency_slo limit); each a number or a dict keyed by "
    "profile name (a profile missing from the dict skips the test)"
)
PARITY_MARKER = (
    "accuracy_parity(reference=None, rouge_ratio=0.99, tokens_per_sample=(0.9, 1.1), "
    "max_kl=None, min_top1=None, dataset=None): fail the test unless the engine's answers "
    "match the reference precision's by MLPerf's ROUGE rule (and the optional KL / top-1 "
    "limits); runs tokperf.accuracy() after the body if the test did not"
)
SLO_MARKER = (
    "latency_slo(ttft_p99_ms=None, tpot_p99_ms=None, ...): fail the test unless its last "
    "tokperf run keeps these latency percentiles (metric ttft/tpot/itl/e2e, percentile "
    "p50/p90/p95/p99/p999) under the limit in ms; each a number or a dict keyed by "
    "profile name; no keywords: the profile's defaults for the run's scenario"
)
NO_REGRESSION_MARKER = (
    "no_regression(tokens_per_s=0.05, ttft_p99=0.10, ...): with --tokperf-compare-baseline, "
    "fail the test when a metric is worse than its baseline by more than this fraction "
    "(confidence interval of the ratio); tokens_per_s defaults to ini tokperf_max_regression, "
    "latency percentiles (ttft/tpot/e2e _p50.._p999) are compared only when named; "
    "None turns a metric off"
)
CAPACITY_MARKER = (
    "capacity_floor(min_qps=..., ttft_p99_ms=None, tpot_p99_ms=None, ...): fail the test "
    "unless its tokperf.capacity() search (run after the body if the test made none) shows "
    "a rate at or above min_qps requests/s meeting every latency SLO given (keywords as "
    "latency_slo; budget_s: the seconds that search may take, default 120); "
    "min_concurrency=N instead of min_qps searches closed-loop serving (N requests in "
    "flight); each a number or a dict keyed by profile name"
)
HELP = (FLOOR_MARKER, PARITY_MARKER, SLO_MARKER, NO_REGRESSION_MARKER, CAPACITY_MARKER)


def check_keywords(
    marker: str,
    keywords: Sequence[str],
    args: Sequence[object],
    kwargs: Mapping[str, object],
    where: str,
) -> None:
    """A marker takes only these keywords: anything else is a usage error naming the test."""
    usage = f"{where}: {marker} takes keywords {', '.join(keywords)}"
    if args:
        raise pytest.UsageError(f"{usage}; got positional arguments {list(args)!r}")
    unknown = sorted(set(kwargs) - set(keywords))
    if unknown:
        raise pytest.UsageError(f"{usage}; got unknown keywords {', '.join(unknown)}")


# --- throughput_floor and latency_slo ------------------------------------------------


def _number(value: object, where: str, what: str = "a floor") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise pytest.UsageError(f"{where}: expected a number, got {value!r}")
    number = finite(value)
    if number is None or not number > 0:
        raise pytest.UsageError(f"{where}: {what} must be a positive number, got {value!r}")
    return number


def _parse_bounds(
    marker: str,
    keywords: Sequence[str],
    args: Sequence[object],
    kwargs: Mapping[str, object],
    where: str,
    profiles: Collection[str],
    what: str,
) -> dict[str, Bound]:
    check_keywords(marker, keywords, args, kwargs, where)
    bounds: dict[str, Bound] = {}
    for key, value in kwargs.items():
        if value is None:
            continue
        if isinstance(value, dict):
            bad = sorted(str(k) for k in value if k not in profiles)
            if bad:
                raise pytest.UsageError(
                    f"{where}: {marker}({key}=...) names unknown profiles "
                    f"{', '.join(bad)}; known profiles: {', '.join(sorted(profiles))}"
                )
            bounds[key] = {k: _number(v, f"{where}: {key}[{k!r}]", what) for k, v in value.items()}
        else:
            bounds[key] = _number(value, f"{where}: {key}", what)
    return bounds


def parse_floor_marker(
    args: Sequence[object], kwargs: Mapping[str, object], where: str, profiles: Collection[str]
) -> dict[str, Bound]:
    """Validate `throughput_floor(...)` arguments; `where` names the test for errors."""
    return _parse_bounds(
        "throughput_floor", [*FLOOR_METRICS, "per_rack", GOODPUT], args, kwargs, where,
        profiles, "a floor",
    )  # fmt: skip


def parse_slo_marker(
    args: Sequence[object], kwargs: Mapping[str, object], where: str, profiles: Collection[str]
) -> dict[str, Bound]:
    """Validate `latency_slo(...)` arguments (`ttft_p99_ms=...` and the like)."""
    return _parse_bounds(
        "latency_slo", SLO_KEYWORDS, args, kwargs, where, profiles, "a latency limit"
    )


def parse_capacity_marker(
    args: Sequence[object], kwargs: Mapping[str, object], where: str, profiles: Collection[str]
) -> dict[str, Bound]:
    """Validate `capacity_floor(...)`: min_qps or min_concurrency (a whole number of
    requests in flight), at least one latency SLO keyword, and optionally budget_s (the
    search the gate runs when the test made none)."""
    keys = ["min_qps", "min_concurrency", "budget_s", *SLO_KEYWORDS]
    bounds = _parse_bounds("capacity_floor", keys, args, kwargs, where, profiles, "a limit")
    floors = [k for k in ("min_qps", "min_concurrency") if k in bounds]
    if len(floors) != 1 or not set(bounds) & set(SLO_KEYWORDS):
        raise pytest.UsageError(
            f"{where}: capacity_floor needs one of min_qps=<requests/s> (Server) or "
            "min_concurrency=<requests in flight> (closed loop), and at least one latency "
            f"SLO such as ttft_p99_ms=...; got {', '.join(sorted(bounds)) or 'nothing'}"
        )
    given = bounds.get("min_concurrency")
    for value in given.values() if isinstance(given, dict) else [given] if given else []:
        if value != int(value):
            raise pytest.UsageError(
                f"{where}: capacity_floor(min_concurrency={value!r}) is a count of requests "
                "in flight: give a whole number such as 4"
            )
    return bounds


# --- accuracy_parity -------------------------------------------------------------------


def _fraction(value: object, where: str, name: str) -> float:
    number = finite(value)
    if number is None or not 0 < number <= 1:
        raise pytest.UsageError(
            f"{where}: accuracy_parity({name}=...) must be a number in (0, 1], got {value!r}"
        )
    return number


def parse_parity_marker(
    args: Sequence[object],
    kwargs: Mapping[str, object],
    where: str,
    precisions: Sequence[str] | None,
    defaults: ParitySpec | None = None,
) -> ParitySpec:
    """Validate `accuracy_parity(...)` arguments; `where` names the test for errors.

    Arguments left out take `defaults` (the profile's parity table), else MLPerf's.

    `precisions` lists the reference precisions the active backend can load (None:
    any name, the backend decides).
    """
    known = ("reference", "rouge_ratio", "tokens_per_sample", "max_kl", "min_top1", "dataset")
    check_keywords("accuracy_parity", known, args, kwargs, where)
    spec = defaults or ParitySpec()
    reference = kwargs.get("reference")
    bad_name = not isinstance(reference, str) or (
        precisions is not None and reference not in precisions
    )
    if reference is not None and bad_name:
        valid = ", ".join(precisions) if precisions is not None else "a precision name"
        raise pytest.UsageError(
            f"{where}: accuracy_parity(reference={reference!r}): expected one of {valid}"
        )
    ratio = kwargs.get("rouge_ratio", spec.rouge_ratio)
    ratio = _fraction(ratio, where, "rouge_ratio")
    band = kwargs.get("tokens_per_sample", spec.tokens_per_sample)
    low, high = (
        (finite(band[0]), finite(band[1]))
        if isinstance(band, (tuple, list)) and len(band) == 2
        else (None, None)
    )
    if low is None or high is None or not 0 <= low <= 1 <= high:
        raise pytest.UsageError(
            f"{where}: accuracy_parity(tokens_per_sample=...) must be (low, high) with "
            f"low <= 1 <= high, e.g. (0.9, 1.1), got {band!r}"
        )
    max_kl = kwargs.get("max_kl")
    if max_kl is not None and not (finite(max_kl) or 0) > 0:
        raise pytest.UsageError(
            f"{where}: accuracy_parity(max_kl=...) must be a positive number (nats), got {max_kl!r}"
        )
    min_top1 = kwargs.get("min_top1")
    if min_top1 is not None:
        min_top1 = _fraction(min_top1, where, "min_top1")
    dataset = kwargs.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        dataset = str(dataset) if hasattr(dataset, "__fspath__") else dataset
        if not isinstance(dataset, str):
            raise pytest.UsageError(
                f"{where}: accuracy_parity(dataset=...) must be a built-in set's name or a "
                f"JSONL path, got {dataset!r}"
            )
    return ParitySpec(
        reference=reference if isinstance(reference, str) else None,
        rouge_ratio=ratio,
        tokens_per_sample=(low, high),
        max_kl=finite(max_kl),
        min_top1=min_top1,
        dataset=dataset,
    )


# --- no_regression ---------------------------------------------------------------------


def parse_no_regression_marker(
    args: Sequence[object], kwargs: Mapping[str, object], where: str
) -> dict[str, float | None]:
    """Validate `no_regression(...)`: each keyword a fraction in [0, 1) or None."""
    check_keywords("no_regression", regression.KEYWORDS, args, kwargs, where)
    out: dict[str, float | None] = {}
    for k, v in kwargs.items():
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1
        ):
            raise pytest.UsageError(
                f"{where}: no_regression({k}=...) must be a fraction from 0 up to 1, got {v!r}"
            )
        out[k] = None if v is None else float(v)
    return out


# --- a test's markers, all of them, combined ------------------------------------------

NAMES = ("throughput_floor", "latency_slo", "accuracy_parity", "no_regression", "capacity_floor")
Placed = tuple[str, Any]  # (where the marker sits: a node id, the marker: a pytest Mark)


@dataclass(frozen=True)
class Spec:
    """What a test's markers ask under one profile, every marker of each kind combined:
    floors and SLOs all apply (the strictest wins), as do the regression tolerances."""

    floors: dict[str, float] | None = None  # None: no throughput_floor applies
    bare_floor: bool = False  # a throughput_floor() without bounds: the profile's floors
    rack_floor: float | None = None  # per_rack, or a bare floor's profile rack_floor
    rack_nodes: int | None = None  # the nodes that rack floor is for (None: any)
    slos: dict[str, float] | None = None  # None: no latency_slo applies
    slo_defaults: bool = False  # a bare latency_slo(): the profile's, for the run's scenario
    parity: ParitySpec | None = None
    no_regression: dict[str, float | None] | None = None
    skip: str | None = None  # why the test does not apply to this profile
    # capacity_floor: min_qps and SLO limits (ms), every marker combined (None: no marker)
    capacity: dict[str, float] | None = None
    goodput_floor: float | None = None  # throughput_floor(min_goodput_tokens_per_s=...)
    places: dict[str, str] = field(default_factory=dict)  # marker name -> where

    def slos_for(self, profile: Profile, scenario: str) -> dict[str, float] | None:
        """The SLO limits for a run of `scenario` (a bare latency_slo(): the profile's
        defaults for it, the tightest of both where the test names some too)."""
        if self.slos is None:
            return None
        slos = dict(self.slos)
        if self.slo_defaults:
            for key, limit in profile.slos.get(scenario, {}).items():
                slos[key] = min(limit, slos.get(key, limit))
        return slos

    @property
    def gated(self) -> bool:
        """A floor or an SLO: the test is judged on a run (the profile's, if it ran none)."""
        return self.floors is not None or self.slos is not None or self.rack_floor is not None


def _strictest(found: Sequence[dict[str, float]], pick: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for bounds in found:
        for key, value in bounds.items():
            out[key] = pick(out[key], value) if key in out else value
    return out


def _bounds(
    marks: Sequence[Placed],
    parse: Any,
    profile: Profile,
    profiles: Collection[str],
    defaults: Mapping[str, float],
    name: str,
) -> tuple[list[dict[str, float]], bool, str | None]:
    """(each applicable marker's bounds, whether one was bare, why none applies)."""
    applicable: list[dict[str, float]] = []
    bare = False
    why = None
    for where, mark in marks:
        bounds = parse(mark.args, mark.kwargs, where, profiles)
        resolved = floors_for(bounds, profile.name, defaults, marker=name)
        if isinstance(resolved, str):
            why = why or resolved
            continue
        bare = bare or not bounds
        applicable.append(resolved)
    return applicable, bare, (why if not applicable else None)


def _one_parity(
    marks: Sequence[Placed],
    precisions: Sequence[str] | None,
    profile: Profile,
    defaults: ParitySpec,
) -> ParitySpec | None:
    specs = [
        (where, parse_parity_marker(mark.args, mark.kwargs, where, precisions, defaults))
        for where, mark in marks
    ]
    if not specs:
        return None
    (first_at, spec), rest = specs[0], specs[1:]
    for at, other in rest:
        for name in ("reference", "dataset"):
            default = profile.reference_precision if name == "reference" else None
            mine, theirs = getattr(spec, name) or default, getattr(other, name) or default
            if mine != theirs:
                raise pytest.UsageError(
                    f"{first_at}: accuracy_parity markers disagree on {name}: {mine!r} "
                    f"(on {first_at}) and {theirs!r} (on {at}); keep one"
                )
        low = max(spec.tokens_per_sample[0], other.tokens_per_sample[0])
        high = min(spec.tokens_per_sample[1], other.tokens_per_sample[1])
        kls = [v for v in (spec.max_kl, other.max_kl) if v is not None]
        top1s = [v for v in (spec.min_top1, other.min_top1) if v is not None]
        spec = replace(
            spec,
            reference=spec.reference or other.reference,
            rouge_ratio=max(spec.rouge_ratio, other.rouge_ratio),
            tokens_per_sample=(low, high),
            max_kl=min(kls, default=None),
            min_top1=max(top1s, default=None),
        )
    under_test = profile.precision if precisions is not None else None
    reference = spec.reference or profile.reference_precision
    if under_test is not None and reference == under_test:
        said = (
            f"accuracy_parity(reference={reference!r}): {reference!r}"
            if spec.reference
            else f"accuracy_parity(): the profile's reference {reference!r}"
        )
        raise pytest.UsageError(
            f"{first_at}: {said} is the precision under test (profile {profile.name}, or "
            "--tokperf-precision): a parity test compares two precisions; name another "
            "reference, or run the engine at another precision"
        )
    return spec


def read(
    marks: Mapping[str, Sequence[Placed]],
    profile: Profile,
    profiles: Collection[str],
    precisions: Sequence[str] | None,
    parity_defaults: ParitySpec,
) -> Spec:
    """The combined `Spec` of a test from its markers by name (closest first, as
    `item.iter_markers_with_node` gives them); a bad marker is a UsageError naming
    where it is."""
    floor_marks = marks.get("throughput_floor", ())
    found, bare, why = _bounds(
        floor_marks, parse_floor_marker, profile, profiles, profile.floors, "throughput_floor"
    )
    floors = _strictest(found, max) if floor_marks and why is None else None
    rack_floor = None if floors is None else floors.pop("per_rack", None)
    goodput_floor = None if floors is None else floors.pop(GOODPUT, None)
    rack_nodes = profile.nodes if profile.nodes > 1 else None
    if bare and rack_floor is None and profile.nodes > 1 and profile.rack_floor is not None:
        rack_floor = profile.rack_floor  # a bare floor on a rack profile: the rack's too
    slo_marks = marks.get("latency_slo", ())
    slo_found, slo_bare, slo_why = _bounds(
        slo_marks, parse_slo_marker, profile, profiles, {}, "latency_slo"
    )
    slos = _strictest(slo_found, min) if slo_marks and slo_why is None else None
    parity = _one_parity(marks.get("accuracy_parity", ()), precisions, profile, parity_defaults)
    tolerances: dict[str, float | None] | None = None
    for where, mark in marks.get("no_regression", ()):
        these = parse_no_regression_marker(mark.args, mark.kwargs, where)
        tolerances = tolerances or {}
        for key, value in these.items():
            old = tolerances.get(key)
            tolerances[key] = value if old is None else (old if value is None else min(old, value))
    cap_marks = marks.get("capacity_floor", ())
    cap_found, _, cap_why = _bounds(
        cap_marks, parse_capacity_marker, profile, profiles, {}, "capacity_floor"
    )
    capacity = None
    if cap_marks and cap_why is None:  # the strictest: the highest load, the lowest limits
        axes = {"min_qps" if "min_qps" in found else "min_concurrency" for found in cap_found}
        if len(axes) > 1:
            raise pytest.UsageError(
                f"{cap_marks[0][0]}: capacity_floor markers mix min_qps and "
                "min_concurrency: a test searches one axis; keep one of them"
            )
        capacity = _strictest(cap_found, min)
        (axis,) = axes
        capacity[axis] = max(found[axis] for found in cap_found)
    places = {name: ms[0][0] for name, ms in marks.items() if ms}
    if goodput_floor is not None and not slo_marks:
        raise pytest.UsageError(
            f"{places['throughput_floor']}: throughput_floor({GOODPUT}=...) counts the tokens "
            "of requests that met every SLO, and the test has none: add a latency_slo(...) "
            "marker (e.g. ttft_p99_ms=2000, tpot_p99_ms=100)"
        )
    return Spec(
        goodput_floor=goodput_floor,
        capacity=capacity,
        floors=floors,
        bare_floor=bare,
        rack_floor=rack_floor,
        rack_nodes=rack_nodes if rack_floor is not None else None,
        slos=slos,
        slo_defaults=slo_bare,
        parity=parity,
        no_regression=tolerances,
        skip=why or slo_why or cap_why,
        places=places,
    )
