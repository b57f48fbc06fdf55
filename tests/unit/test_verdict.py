"""Floor parsing (usage errors name the test and the valid choices) and judging."""

from __future__ import annotations

import pytest

from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.markers import parse_floor_marker
from pytest_tokperf.metrics import NS, summarize
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.verdict import floors_for, judge

WHERE = "test_x.py::test_y"


def parse(*args: object, **kwargs: object):
    return parse_floor_marker(args, kwargs, WHERE, BUILTIN)


def test_numbers_and_dicts_are_accepted() -> None:
    assert parse(per_gpu=15_200) == {"per_gpu": 15_200.0}
    assert parse(min_tokens_per_s=None, per_gpu={"gb300-nvl72": 15_200, "cpu": 10}) == {
        "per_gpu": {"gb300-nvl72": 15_200.0, "cpu": 10.0}
    }


@pytest.mark.parametrize(
    ("args", "kwargs", "says"),
    [
        ((100,), {}, "positional"),
        ((), {"per_gpus": 1}, "unknown keywords per_gpus"),
        ((), {"per_gpu": 0}, "positive"),
        ((), {"per_gpu": -5}, "positive"),
        ((), {"per_gpu": "fast"}, "expected a number"),
        ((), {"per_gpu": True}, "expected a number"),
        ((), {"per_gpu": {"gb300-nvl27": 15_200}}, "unknown profiles gb300-nvl27; known"),
        ((), {"per_gpu": {"cpu": -1}}, "per_gpu['cpu']"),
    ],
)
def test_bad_arguments_are_usage_errors(args, kwargs, says) -> None:
    with pytest.raises(pytest.UsageError, match=WHERE) as info:
        parse_floor_marker(args, kwargs, WHERE, BUILTIN)
    assert says in str(info.value)


def test_floors_for_profile() -> None:
    bounds = parse(per_gpu={"gb300-nvl72": 15_200}, min_tokens_per_s=5)
    assert floors_for(bounds, "gb300-nvl72", {}) == {"per_gpu": 15_200, "min_tokens_per_s": 5}
    reason = floors_for(bounds, "cpu", {})
    assert isinstance(reason, str) and "no floor for profile 'cpu'" in reason
    # a bare marker takes the profile's default floors
    assert floors_for({}, "cpu", {"per_gpu": 10.0}) == {"per_gpu": 10.0}


def _result(tokens: int, seconds: float, devices: int, error: str | None = None):
    """Ten requests (the fewest an Offline floor takes) streaming `tokens` one-token
    chunks between them at an exactly steady rate; `error` fails the first."""
    span = int(seconds * NS)
    chunks = tuple(span * (2 * i + 1) // (2 * tokens) for i in range(tokens))
    recs = [
        RequestRecord(f"r{j}", 0, span, chunks[j::10], (1,) * len(chunks[j::10]),
                      error=error if j == 0 else None)
        for j in range(10)
    ]  # fmt: skip
    return summarize(
        recs, EngineInfo("t", "m", "p", devices), scenario="offline", workload="w", max_tokens=None
    )


def test_judge_compares_each_floor() -> None:
    res = _result(1000, 1.0, devices=4)  # 1000 tok/s, 250 per device, the same in every window
    assert judge(res, {"per_gpu": 250.0}).status == "PASS"  # equal to the floor passes
    v = judge(res, {"per_gpu": 251.0, "min_tokens_per_s": 900.0})
    assert v.status == "FAIL"
    assert [c.metric for c in v.failed] == ["per_gpu"]
    assert v.failed[0].observed == pytest.approx(250.0)
    # a steady rate has a zero-width interval at the observed value
    assert v.failed[0].ci_low == pytest.approx(250.0) == v.failed[0].ci_high


def test_a_failed_request_fails_the_verdict() -> None:
    res = _result(1000, 1.0, devices=1, error="boom")
    v = judge(res, {"per_gpu": 1.0})
    assert v.status == "FAIL"
    assert [c.metric for c in v.failed] == ["failed_requests"]  # the other 9 make the floor
