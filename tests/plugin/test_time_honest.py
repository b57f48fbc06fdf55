"""Verdicts time cannot fool, through pytest on the sim engine: the run's minimum, a
throttling engine, a busy machine (issue 22)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

QUIET = ("-p", "no:cacheprovider", "--tokperf-json", "out.json")


def _tests(pytester: pytest.Pytester) -> dict[str, dict]:
    doc = json.loads((pytester.path / "out.json").read_text())
    return {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}


MINIMUM = """
import pytest

@pytest.mark.throughput_floor(per_gpu=1)
def test_short(tokperf):
    tokperf.run(requests=12, max_tokens=8)

@pytest.mark.throughput_floor(per_gpu=1)
def test_default_size(tokperf):
    result = tokperf.run()  # the profile's size: its queue refilled to last the minimum
    assert result.requests > 16

@pytest.mark.throughput_floor(per_gpu=1)
def test_early_stop(tokperf):
    result = tokperf.run("concurrency", concurrency=4, max_duration_s=30, max_tokens=8)
    assert result.stopped.startswith("early stop") and result.duration_s >= 3
"""


def test_no_pass_before_the_minimum_and_no_early_stop_either(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKPERF_MIN_DURATION")
    pytester.makepyfile(test_min=MINIMUM)
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "sim", "--tokperf-min-duration", "3")
    result.assert_outcomes(passed=2, failed=1)
    tests = _tests(pytester)
    short = tests["test_short"]
    assert short["verdict"] == "INCONCLUSIVE" and short["duration_s"] < 3
    result.stdout.fnmatch_lines(["*INCONCLUSIVE: the run lasted *, shorter than the 3 s a judged*"])
    assert tests["test_default_size"]["verdict"] == "PASS"
    assert tests["test_default_size"]["duration_s"] >= 3
    assert tests["test_early_stop"]["verdict"] == "PASS"
    # the sim profile's own minimum is 10 s
    assert json.loads((pytester.path / "out.json").read_text())["profile"]["min_duration_s"] == 3


THROTTLE = """
[profiles.hot]
extends = "sim"

[profiles.hot.engine]
tokens_per_s = 100.0
jitter = 0.1
slots = 4
time_scale = 10.0
throttle_after_s = 30.0
throttle_factor = 0.5
"""
HOT = """
import pytest

@pytest.mark.throughput_floor(min_tokens_per_s=0.7 * 4 * 100 * 10)
def test_hot(tokperf):
    tokperf.run("concurrency", concurrency=4, max_duration_s=12, max_tokens=16)
"""


def test_an_engine_that_throttles_after_its_fresh_start_does_not_pass(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh for 3 s (30 simulated s at time_scale 10), then half speed; the floor at
    0.7x the fresh rate: a verdict before the throttle would PASS on the fresh start,
    which is why the minimum (here 5 s) must outlast the engine's fresh spell."""
    monkeypatch.setenv("TOKPERF_MIN_DURATION", "5")
    pytester.makefile(".toml", tokperf=THROTTLE)
    pytester.makepyfile(test_hot=HOT)
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "hot")
    result.assert_outcomes(failed=1)
    test = _tests(pytester)["test_hot"]
    assert test["verdict"] in ("FAIL", "INVALID")
    (floor,) = [c for c in test["checks"] if c["kind"] == "floor"]
    said = floor["detail"] + " ".join(test["invalid"])
    assert "the rate fell from" in said, said


def test_a_busy_machine_is_named_in_the_verdict(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process outside the run spins on the machine's cores while the run is measured."""
    monkeypatch.setenv("TOKPERF_BUSY_MACHINE", "invalid")
    pytester.makepyfile(
        test_busy="""
        import pytest

        @pytest.mark.throughput_floor(per_gpu=1)
        def test_beside_a_spinner(tokperf):
            tokperf.run("concurrency", concurrency=2, duration_s=3, max_tokens=8)
        """
    )
    spin = "import time\nt = time.time()\nwhile time.time() - t < 60: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:  # a subprocess run: the spinners are its siblings, not its own children
        result = pytester.runpytest_subprocess(*QUIET, "--tokperf-profile", "sim")
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*INVALID measurement: the machine was busy: other processes kept *"]
    )
    test = _tests(pytester)["test_beside_a_spinner"]
    assert test["verdict"] == "INVALID" and test["telemetry"]["cpu"]["others_cores"] >= 0.5
