"""The one judgment: how checks decide a test, and how a test's markers combine."""

from __future__ import annotations

import pytest

from pytest_tokperf import markers, reference, verdict
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.verdict import check, decide


def _c(status: str, kind: str) -> verdict.Check:
    return check("m", status, kind)


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        ([], "MEASURED"),
        ([_c("PASS", "requests")], "MEASURED"),  # nothing failed, nothing gated it
        ([_c("PASS", "requests"), _c("PASS", "floor")], "PASS"),
        ([_c("PASS", "floor"), _c("NOT MEASURED", "baseline")], "PASS"),
        ([_c("NOT MEASURED", "baseline")], "MEASURED"),  # nothing compared is no pass
        ([_c("PASS", "floor"), _c("ACKNOWLEDGED", "regression")], "ACKNOWLEDGED"),
        ([_c("PASS", "floor"), _c("INCONCLUSIVE", "evidence")], "INCONCLUSIVE"),
        ([_c("INCONCLUSIVE", "floor"), _c("INVALID", "slo")], "INVALID"),
        ([_c("INVALID", "slo"), _c("FAIL", "floor")], "FAIL"),  # a decisive miss is a miss
        ([_c("FAIL", "floor"), _c("INVALID", "validity")], "INVALID"),  # unless unmeasured
        ([_c("INVALID", "validity"), _c("FAIL", "requests")], "FAIL"),  # failures are facts
        ([_c("FAIL", "node"), _c("INVALID", "validity")], "FAIL"),
        ([_c("FAIL", "requests"), _c("INVALID", "interrupted")], "INVALID"),  # a cut run
        ([_c("PASS", "floor"), _c("FAIL", "requests")], "FAIL"),
    ],
)
def test_decide_ranks_every_kind_of_check(checks: list[verdict.Check], expected: str) -> None:
    assert decide(checks) == expected
    assert decide(list(reversed(checks))) == expected  # the order of checks never matters


def _marks(*made: tuple[str, pytest.MarkDecorator]) -> dict[str, list[markers.Placed]]:
    out: dict[str, list[markers.Placed]] = {}
    for where, decorator in made:
        out.setdefault(decorator.mark.name, []).append((where, decorator.mark))
    return out


def _read(profile: str, *made: tuple[str, pytest.MarkDecorator]) -> markers.Spec:
    p = BUILTIN[profile]
    return markers.read(_marks(*made), p, BUILTIN, ("q4_1", "f16", "q8_0", "q4_0"),
                        reference.defaults(p))  # fmt: skip


def test_floors_combine_to_the_strictest_and_slos_to_the_tightest() -> None:
    spec = _read(
        "cpu",
        ("t.py::test_a", pytest.mark.throughput_floor(per_gpu=2, min_tokens_per_s=50)),
        ("t.py", pytest.mark.throughput_floor(per_gpu={"cpu": 8, "gb300-nvl72": 15_200})),
        ("t.py::test_a", pytest.mark.latency_slo(ttft_p50_ms=500)),
        ("t.py", pytest.mark.latency_slo(ttft_p50_ms=900, tpot_p50_ms=40)),
        ("t.py::test_a", pytest.mark.no_regression(tokens_per_s=0.2, ttft_p99=None)),
        ("t.py", pytest.mark.no_regression(tokens_per_s=0.1, ttft_p99=0.3)),
    )
    assert spec.floors == {"per_gpu": 8, "min_tokens_per_s": 50}
    assert spec.slos == {"ttft_p50_ms": 500, "tpot_p50_ms": 40}
    assert spec.no_regression == {"tokens_per_s": 0.1, "ttft_p99": 0.3}
    assert spec.gated and spec.skip is None


def test_a_marker_for_other_profiles_does_not_apply_and_none_applying_skips() -> None:
    other = pytest.mark.throughput_floor(per_gpu={"gb300-nvl72": 15_200})
    spec = _read("cpu", ("t.py", other), ("t.py::x", pytest.mark.throughput_floor(per_gpu=3)))
    assert spec.floors == {"per_gpu": 3} and spec.skip is None
    alone = _read("cpu", ("t.py", other))
    assert alone.floors is None and alone.skip is not None and "gb300-nvl72" in alone.skip


def test_a_bare_floor_on_a_rack_profile_carries_the_rack_floor_and_its_nodes() -> None:
    spec = _read("gb300-nvl72", ("t.py::x", pytest.mark.throughput_floor()))
    rack = BUILTIN["gb300-nvl72"]
    assert spec.bare_floor and spec.floors == dict(rack.floors)
    assert (spec.rack_floor, spec.rack_nodes) == (rack.rack_floor, rack.nodes)
    single = _read("cpu", ("t.py::x", pytest.mark.throughput_floor()))
    assert single.rack_floor is None and single.rack_nodes is None


def test_parity_markers_that_disagree_on_the_reference_are_a_usage_error() -> None:
    with pytest.raises(pytest.UsageError, match=r"disagree on reference: 'f16'.*'q8_0'"):
        _read(
            "cpu",
            ("t.py::x", pytest.mark.accuracy_parity(reference="f16")),
            ("t.py", pytest.mark.accuracy_parity(reference="q8_0", rouge_ratio=0.9)),
        )
    spec = _read(
        "cpu",
        ("t.py::x", pytest.mark.accuracy_parity(rouge_ratio=0.9, max_kl=0.2)),
        ("t.py", pytest.mark.accuracy_parity(reference="f16", max_kl=0.1)),
    )
    assert spec.parity is not None
    assert (spec.parity.reference, spec.parity.rouge_ratio, spec.parity.max_kl) == (
        "f16",
        0.99,  # the profile's default in the second marker is the stricter one
        0.1,
    )
    with pytest.raises(pytest.UsageError, match="is the precision under test"):
        _read("cpu", ("t.py::x", pytest.mark.accuracy_parity(reference="q4_1")))
