"""capacity_floor through the gate on the sim engine of issue 23's acceptance: 4 slots,
0.05 s + 28 tokens at 100 tokens/s = 0.33 simulated s per request, time_scale 10, so
4 / 0.033 = about 120 requests/s saturate it."""

from __future__ import annotations

import json

import pytest

QUIET = ("-p", "no:cacheprovider")
ARGS = (*QUIET, "--tokperf-profile", "sim4", "--tokperf-json", "out.json")
PROFILE = """
[profiles.sim4]
extends = "sim"
max_tokens = 29
engine = { slots = 4, ttft_s = 0.05, tokens_per_s = 100.0, jitter = 0.2, time_scale = 10.0 }
"""
SUITE = """
import pytest

@pytest.mark.capacity_floor(min_qps=60, ttft_p99_ms=2000, tpot_p99_ms=100)
def test_sixty(tokperf):
    found = tokperf.capacity(probe_s=10, budget_s=25)
    print("capacity found:", found.max_qps)

# no tokperf.capacity() in the body: the gate runs the search, within the marker's budget
@pytest.mark.capacity_floor(min_qps=180, ttft_p99_ms=2000, tpot_p99_ms=100, budget_s=1)
def test_one_eighty(tokperf):
    tokperf.capacity_floor  # asks for the fixture
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOKPERF_PROFILE", "TOKPERF_RECORDS", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKPERF_MIN_DURATION", "10")  # the sim profile's own minimum


def _tests(pytester: pytest.Pytester) -> dict[str, dict]:
    doc = json.loads((pytester.path / "out.json").read_text())
    return {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}


def test_sixty_passes_and_one_eighty_fails_on_a_120_qps_engine(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makepyfile(test_cap=SUITE)
    result = pytester.runpytest(*ARGS, "-s")
    result.assert_outcomes(passed=1, failed=1)
    tests = _tests(pytester)
    sixty, high = tests["test_sixty"], tests["test_one_eighty"]
    assert sixty["verdict"] == "PASS" and high["verdict"] in ("FAIL", "INVALID")
    (check,) = [c for c in sixty["checks"] if c["kind"] == "capacity"]
    found = sixty["capacity"]
    assert check["status"] == "PASS" and check["limit"] == 60
    # the probe at the floor was made, and passed on every SLO's early-stopping estimate
    (floor,) = [p for p in found["probes"] if p["qps"] == 60]
    assert floor["status"] == "PASS"
    for key in ("ttft_p99_ms", "tpot_p99_ms"):
        slo = floor["slos"][key]
        assert slo["status"] == "PASS" and slo["count"] >= slo["needed"] >= 459
    # at 60 requests/s for 10 s: about 600 arrivals (Poisson: 4 sigma is 100)
    assert 500 <= floor["requests"] <= 700
    # an Offline run of 4 slots x 1 / 0.033 s: about 120 requests/s (jitter and the last
    # round's straggler pull it down), and no capacity above saturation plus a margin
    assert 90 <= found["saturation_qps"] <= 125
    assert found["max_qps"] is not None and 60 <= found["max_qps"] <= 150
    result.stdout.fnmatch_lines(["capacity found: *"])
    # 180 requests/s against 120: the queue grows by 60 a second, so after 10 s the last
    # requests wait about 600 / 120 = 5 s: the observed TTFT p99 misses 2 s
    (miss,) = [p for p in high["capacity"]["probes"] if p["qps"] == 180]
    assert high["capacity"]["stopped"] == "budget" and len(high["capacity"]["probes"]) == 1
    if high["verdict"] == "INVALID":  # a loaded 2-core machine could not issue 180/s
        assert miss["status"] == "INVALID" and "fell behind" in miss["why"], miss["why"]
        return
    assert miss["status"] == "FAIL" and miss["slos"]["ttft_p99_ms"]["observed_ms"] > 2000
    result.stdout.fnmatch_lines(["*capacity floor 180 requests/s not served*TTFT p99*"])


def test_capacity_floor_usage_errors_stop_the_session(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.capacity_floor(ttft_p99_ms=2000)
def test_x(tokperf):
    pass
"""
    )
    result = pytester.runpytest(*ARGS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_x: capacity_floor needs one of min_qps=<requests/s>*"])
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.capacity_floor(min_qps=10, ttft_p99_ms=2000)
@pytest.mark.capacity_floor(min_concurrency=4, ttft_p99_ms=2000)
def test_x(tokperf):
    pass
"""
    )
    result = pytester.runpytest(*ARGS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*capacity_floor markers mix min_qps and min_concurrency*"])


def test_a_profile_missing_from_the_dict_skips(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makepyfile(
        test_dict="""
import pytest

@pytest.mark.capacity_floor(min_qps={"cpu": 5}, ttft_p99_ms=2000)
def test_x(tokperf):
    raise AssertionError("never runs under sim4")
"""
    )
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(skipped=1)
    assert _tests(pytester)["test_x"]["verdict"] == "SKIPPED"


def test_a_capacity_without_the_marker_is_measured_not_passed(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makepyfile(
        test_free="""
def test_x(tokperf):
    tokperf.capacity(slos={"ttft_p99_ms": 2000}, budget_s=1, min_qps=40)
"""
    )
    result = pytester.runpytest(*ARGS, "--tokperf-min-duration", "0")
    result.assert_outcomes(passed=1)
    test = _tests(pytester)["test_x"]
    assert test["verdict"] == "MEASURED" and [p["qps"] for p in test["capacity"]["probes"]] == [40]


CLOSED = """
[profiles.slots4]
extends = "sim"
max_tokens = 29
engine = { slots = 4, ttft_s = 0.05, tokens_per_s = 100.0, jitter = 0.2, time_scale = 5.0 }
"""
CLOSED_SUITE = """
import pytest

@pytest.mark.capacity_floor(min_concurrency=4, ttft_p90_ms=40)
def test_four_in_flight(tokperf):
    found = tokperf.capacity(budget_s=12)
    print("capacity found:", found.max_concurrency, "first fail", found.first_fail)

@pytest.mark.capacity_floor(min_concurrency=16, ttft_p90_ms=40, budget_s=1)
def test_sixteen_in_flight(tokperf):
    tokperf.capacity_floor
"""


def test_min_concurrency_passes_at_the_slots_and_fails_far_above(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 slots of (0.05 + 28 / 100) / 5 = 0.066 s a request. Up to 4 in flight nobody
    waits: TTFT is 0.05 / 5 = 10 ms. Closed loop with c > 4, a request issued when one
    ends finds the c - 4 ahead of it and waits for about (c - 4) / 4 services: 16 in
    flight wait about 3 x 66 = 200 ms, far over 40 ms; 8 wait about 66 ms."""
    monkeypatch.setenv("TOKPERF_MIN_DURATION", "2")
    pytester.makefile(".toml", tokperf=CLOSED)
    pytester.makepyfile(test_closed=CLOSED_SUITE)
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "slots4", "--tokperf-json",
                                "out.json", "-s")  # fmt: skip
    result.assert_outcomes(passed=1, failed=1)
    tests = _tests(pytester)
    four, sixteen = tests["test_four_in_flight"], tests["test_sixteen_in_flight"]
    found = four["capacity"]
    assert four["verdict"] == "PASS" and found["axis"] == "concurrency"
    (check,) = [c for c in four["checks"] if c["kind"] == "capacity"]
    assert check["metric"] == "min_concurrency" and check["status"] == "PASS"
    assert found["probes"][0]["concurrency"] == 4 and found["probes"][0]["status"] == "PASS"
    assert all(p["qps"] is None and p["concurrency"] == int(p["concurrency"])
               for p in found["probes"])  # fmt: skip
    assert 4 <= found["max_concurrency"] <= 7 and found["first_fail"] <= 8
    # each probe kept enough requests for LoadGen's p90 minimum
    for p in found["probes"]:
        slo = p["slos"]["ttft_p90_ms"]
        assert slo["count"] >= slo["needed"] or p["status"] == "FAIL"
    (miss,) = sixteen["capacity"]["probes"]
    assert sixteen["verdict"] == "FAIL" and miss["status"] == "FAIL"
    assert miss["slos"]["ttft_p90_ms"]["observed_ms"] > 100
    result.stdout.fnmatch_lines(["*capacity floor 16 requests in flight not served*TTFT p90*"])
