"""throughput_floor(min_goodput_tokens_per_s=...) through the gate on the sim engine.

The sim profile's engine (4 slots, TTFT 0.05 s, 100 tokens/s per request) at 5
requests/s of 16-token answers serves about 80 output tokens/s, all inside a 60 s TTFT
limit: a goodput floor of 30 passes, one of 250 fails."""

from __future__ import annotations

import json

import pytest

ARGS = ("-p", "no:cacheprovider", "--tokperf-profile", "sim", "--tokperf-json", "out.json")
SUITE = """
import pytest

def serve(tokperf):
    return tokperf.run("server", qps=5, duration_s=10, max_tokens=16)

@pytest.mark.latency_slo(ttft_p50_ms=60_000)
@pytest.mark.throughput_floor(min_goodput_tokens_per_s=30)
def test_low(tokperf):
    serve(tokperf)

@pytest.mark.latency_slo(ttft_p50_ms=60_000)
@pytest.mark.throughput_floor(min_goodput_tokens_per_s={"sim": 250})
def test_high(tokperf):
    serve(tokperf)
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOKPERF_PROFILE", "TOKPERF_RECORDS", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKPERF_MIN_DURATION", "5")


def test_goodput_floor_passes_below_and_fails_above(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_good=SUITE)
    result = pytester.runpytest(*ARGS)
    doc = json.loads((pytester.path / "out.json").read_text())
    tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
    for name, status, floor in (("test_low", "PASS", 30), ("test_high", "FAIL", 250)):
        test = tests[name]
        (check,) = [c for c in test["checks"] if c["kind"] == "goodput"]
        assert check["limit"] == floor and check["status"] == status, check["detail"]
        assert test["verdict"] == status
        # the check's number is the result's goodput, which lies near 5 x 16 = 80 tokens/s
        assert check["observed"] == pytest.approx(test["goodput_tokens_per_s"])
        assert 50 < check["observed"] < 110
        assert check["ci_low"] <= check["observed"] <= check["ci_high"]
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*server goodput * output tokens/s*< floor 250.0*"])


def test_goodput_floor_without_slos_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.throughput_floor(min_goodput_tokens_per_s=30)
def test_x(tokperf):
    pass
"""
    )
    result = pytester.runpytest(*ARGS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*min_goodput_tokens_per_s*add a latency_slo*"])
