"""Every PASS earned on every path: the side paths that once went green (issue 21).

One test per path, each on the sim engine unless the path is the embedded engine's
own (parity precisions, the engine child). Each asserts the outcome pytest reports and
the verdict in the JSON results, so a path that goes green again fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_tokperf import calibrate

QUIET = ("-p", "no:cacheprovider")
SIM = (*QUIET, "--tokperf-profile", "sim", "--tokperf-json", "out.json")
DATA = Path(__file__).parents[1] / "data" / "nvml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOKPERF_PROFILE", "TOKPERF_NVML_RECORDING", "TOKPERF_RECORDS", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _tests(pytester: pytest.Pytester, name: str = "out.json") -> dict[str, dict]:
    doc = json.loads((pytester.path / name).read_text())
    return {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}


def _profile(pytester: pytest.Pytester, body: str) -> None:
    pytester.makefile(".toml", tokperf=body)


# --- 1. a regression-only gate sees failures and invalid runs -----------------------

FAILING = """
[profiles.flaky]
extends = "sim"
engine = {{ fail_prob = {fail}, jitter = 0.1, time_scale = 4.0 }}
"""
REGRESSION_ONLY = """
import pytest

@pytest.mark.no_regression(tokens_per_s=0.5)
def test_rate(tokperf):
    tokperf.run(requests=24, max_tokens=16)
"""


def test_regression_only_gate_fails_on_failed_requests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_reg=REGRESSION_ONLY)
    _profile(pytester, FAILING.format(fail=0.0))
    args = (*QUIET, "--tokperf-profile", "flaky", "--tokperf-json", "out.json")
    pytester.runpytest(*args, "--tokperf-save-baseline", "base").assert_outcomes(passed=1)
    _profile(pytester, FAILING.format(fail=0.3))
    result = pytester.runpytest(*args, "--tokperf-compare-baseline", "base")
    result.assert_outcomes(failed=1)
    test = _tests(pytester)["test_rate"]
    assert test["verdict"] == "FAIL" and test["failed"] > 0
    result.stdout.fnmatch_lines(["*requests failed (none may fail)*"])


OVERLOAD = """
import pytest

@pytest.mark.no_regression(tokens_per_s=0.5)
def test_overload(tokperf):
    # 4 slots of 100 tokens/s with 16-token answers serve about 25 requests/s: 400 is
    # far beyond it, so the run is INVALID ("did not sustain the offered load")
    tokperf.run("server", qps=400, requests=60, max_tokens=16)
"""


def test_an_invalid_run_fails_and_is_never_saved_as_a_baseline(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_over=OVERLOAD)
    result = pytester.runpytest(*SIM, "--tokperf-save-baseline", "base")
    result.assert_outcomes(failed=1)
    test = _tests(pytester)["test_overload"]
    assert test["verdict"] == "INVALID"
    assert any("did not sustain the offered load" in r for r in test["invalid"])
    assert "baseline_saved" not in test and not list((pytester.path / "base").glob("*.json"))


# --- 2. a missing baseline is not a pass ----------------------------------------------


def test_compare_without_a_matching_baseline_fails_unless_told_otherwise(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_reg=REGRESSION_ONLY)
    (pytester.path / "empty").mkdir()
    result = pytester.runpytest(*SIM, "--tokperf-compare-baseline", "empty")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no baseline for this test in empty*"])
    assert _tests(pytester)["test_rate"]["verdict"] == "FAIL"
    told = pytester.runpytest(
        *SIM, "--tokperf-compare-baseline", "empty", "--tokperf-baseline-missing", "inconclusive"
    )
    told.assert_outcomes(failed=1)  # INCONCLUSIVE fails under the default policy
    assert _tests(pytester)["test_rate"]["verdict"] == "INCONCLUSIVE"
    allowed = pytester.runpytest(
        *SIM, "--tokperf-compare-baseline", "empty", "--tokperf-baseline-missing", "pass"
    )
    allowed.assert_outcomes(passed=1)
    test = _tests(pytester)["test_rate"]
    assert test["verdict"] == "MEASURED"  # nothing was compared: not a PASS
    (check,) = [c for c in test["checks"] if c["kind"] == "baseline"]
    assert check["status"] == "NOT MEASURED"


# --- 3. markers added at run time count -----------------------------------------------

RUNTIME_CONFTEST = """
import pytest

def pytest_collection_modifyitems(items):
    for item in items:
        if item.name == "test_from_conftest":
            item.add_marker(pytest.mark.throughput_floor(min_tokens_per_s=1e9))

@pytest.fixture
def impossible(request):
    request.node.add_marker(pytest.mark.throughput_floor(min_tokens_per_s=1e9))
"""
RUNTIME_SUITE = """
def test_from_conftest(tokperf):
    tokperf.run(requests=12, max_tokens=8)

def test_from_fixture(impossible, tokperf):
    tokperf.run(requests=12, max_tokens=8)
"""


def test_markers_added_by_conftest_or_fixture_are_judged(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RUNTIME_CONFTEST)
    pytester.makepyfile(test_runtime=RUNTIME_SUITE)
    result = pytester.runpytest(*SIM)
    result.assert_outcomes(failed=2)
    tests = _tests(pytester)
    for name in ("test_from_conftest", "test_from_fixture"):
        assert tests[name]["verdict"] == "FAIL"
        assert tests[name]["floors"] == {"min_tokens_per_s": 1e9}


# --- 4. several markers of one kind all apply -----------------------------------------

STACKED = """
import pytest

pytestmark = pytest.mark.throughput_floor(min_tokens_per_s=1e9)

@pytest.mark.throughput_floor(per_gpu=1)
def test_module_and_function(tokperf):
    tokperf.run(requests=12, max_tokens=8)
"""
TWO_DECORATORS = """
import pytest

@pytest.mark.throughput_floor(per_gpu=1)
@pytest.mark.throughput_floor(per_gpu=1e9)
def test_hard_below(tokperf):
    tokperf.run(requests=12, max_tokens=8)

@pytest.mark.throughput_floor(per_gpu=1e9)
@pytest.mark.throughput_floor(per_gpu=1)
def test_hard_above(tokperf):
    tokperf.run(requests=12, max_tokens=8)
"""


def test_every_floor_marker_applies_and_the_strictest_wins(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_stacked=STACKED, test_two=TWO_DECORATORS)
    result = pytester.runpytest(*SIM)
    result.assert_outcomes(failed=3)
    tests = _tests(pytester)
    assert tests["test_module_and_function"]["floors"] == {
        "min_tokens_per_s": 1e9,
        "per_gpu": 1,
    }
    for name in ("test_hard_below", "test_hard_above"):
        assert tests[name]["floors"] == {"per_gpu": 1e9} and tests[name]["verdict"] == "FAIL"


# --- 5. a rack profile's default floor needs the rack ---------------------------------

RACK_PROFILE = """
[profiles.rack18]
extends = "sim"
nodes = 18
rack_floor = 1e9
floors = { per_gpu = 1 }
"""
BARE = """
import pytest

@pytest.mark.throughput_floor()
def test_default(tokperf):
    tokperf.run(requests=12, max_tokens=8)
"""


def test_a_bare_floor_on_a_rack_profile_skips_on_one_node(pytester: pytest.Pytester) -> None:
    _profile(pytester, RACK_PROFILE)
    pytester.makepyfile(test_bare=BARE)
    args = (*QUIET, "--tokperf-profile", "rack18", "--tokperf-json", "out.json", "-rs")
    result = pytester.runpytest(*args)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*rack18*18 nodes*this run has 1*"])
    assert _tests(pytester)["test_default"]["verdict"] == "SKIPPED"
    strict = pytester.runpytest(*args, "--tokperf-require-hardware")
    strict.assert_outcomes(errors=1)  # in setup, as a missing GPU is
    strict.stdout.fnmatch_lines(["*this run has 1*(--tokperf-require-hardware)*"])


# --- 6. merge counts each node once ---------------------------------------------------

NODE = """
import pytest

@pytest.mark.throughput_floor(per_gpu=1.0)
def test_node(tokperf):
    tokperf.run(requests=12, max_tokens=8)
"""


def _merge(pytester: pytest.Pytester, *args: str) -> subprocess.CompletedProcess[str]:
    cli = [sys.executable, "-m", "pytest_tokperf", "merge", *args]
    return subprocess.run(cli, cwd=pytester.path, capture_output=True, text=True, check=False)


def test_merge_refuses_one_run_twice_and_a_rack_of_one(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_node=NODE)
    pytester.runpytest(
        *SIM[:-2], "--tokperf-json", "node1.json", "--tokperf-records", "node1.jsonl"
    ).assert_outcomes(passed=1)
    twice = _merge(pytester, "node1.json", "node1.json", "--per-rack", "1")
    assert twice.returncode == 2, twice.stdout + twice.stderr
    assert "node1.json and node1.json are the same run" in twice.stderr
    alone = _merge(pytester, "node1.json", "--per-rack", "1")
    assert alone.returncode == 2, alone.stdout + alone.stderr
    assert "a rack needs at least 2 nodes" in alone.stderr


# --- 7. parity never compares an engine with itself ----------------------------------

SELF_PARITY = """
import pytest

@pytest.mark.accuracy_parity(reference="q4_1")
def test_self(tokperf):
    pass
"""
DEFAULT_PARITY = """
import pytest

@pytest.mark.accuracy_parity()
def test_default_reference(tokperf):
    pass
"""


def test_parity_against_the_precision_under_test_is_a_usage_error(
    pytester: pytest.Pytester,
) -> None:
    pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")
    pytester.makepyfile(test_self=SELF_PARITY)
    result = pytester.runpytest(*QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*reference='q4_1'* is the precision under test*"])
    pytester.makepyfile(test_self=DEFAULT_PARITY)
    result = pytester.runpytest(*QUIET, "--tokperf-precision", "f16")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*reference 'f16'* is the precision under test*"])


# --- 8. too little evidence is not a pass ---------------------------------------------

ONE_REQUEST = """
import pytest

@pytest.mark.throughput_floor(per_gpu=1)
def test_one(tokperf):
    tokperf.run(requests=1, max_tokens=32)
"""
ITL_FROM_TWO = """
import pytest

@pytest.mark.latency_slo(itl_p99_ms=60_000)
def test_itl(tokperf):
    tokperf.run("concurrency", concurrency=2, requests=2, max_tokens=600)
"""


def test_an_offline_floor_on_one_request_is_inconclusive(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_one=ONE_REQUEST)
    result = pytester.runpytest(*SIM)
    result.assert_outcomes(failed=1)
    test = _tests(pytester)["test_one"]
    assert test["verdict"] == "INCONCLUSIVE"
    result.stdout.fnmatch_lines(["*1 request*at least 10 needed*"])


def test_an_itl_percentile_counts_requests_not_gaps(pytester: pytest.Pytester) -> None:
    _profile(pytester, '[profiles.fast]\nextends = "sim"\nengine = { time_scale = 20.0 }\n')
    pytester.makepyfile(test_itl=ITL_FROM_TWO)
    args = (*QUIET, "--tokperf-profile", "fast", "--tokperf-json", "out.json")
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=1)
    test = _tests(pytester)["test_itl"]
    assert test["verdict"] == "INVALID"
    result.stdout.fnmatch_lines(["*ITL p99*2 requests*at least 459 requests*"])


PARITY_SAMPLES = """
import pytest

@pytest.mark.accuracy_parity(reference="f16", max_kl=0.5)
def test_one_sample(tokperf):
    tokperf.accuracy(samples=1, max_tokens=8)

def test_more_than_the_workload(tokperf):
    with pytest.raises(ValueError, match="samples=500.*64 prompts"):
        tokperf.accuracy(samples=500, max_tokens=8)
"""


def test_parity_needs_eight_samples_and_no_more_than_the_workload(
    pytester: pytest.Pytester,
) -> None:
    pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")
    pytest.importorskip("rouge_score", reason="needs the 'embedded' extra")
    pytester.makepyfile(test_samples=PARITY_SAMPLES)
    result = pytester.runpytest(*QUIET, "--tokperf-json", "out.json", "--tokperf-precision", "q8_0")
    result.assert_outcomes(passed=1, failed=1)
    test = _tests(pytester)["test_one_sample"]
    assert test["verdict"] == "INCONCLUSIVE"
    result.stdout.fnmatch_lines(["*1 sample*at least 8 needed*"])


# --- 9. client processes keep the asked concurrency ------------------------------------

ONE_STREAM = """
def test_one_stream(tokperf):
    result = tokperf.run("concurrency", concurrency=1, requests=8, max_tokens=8)
    spans = sorted((r.issue_ns, r.end_ns) for r in result.records)
    overlaps = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    assert overlaps == 0, f"{overlaps} requests began before the one before had ended"
"""


def test_client_processes_never_raise_the_concurrency(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_stream=ONE_STREAM)
    result = pytester.runpytest(*SIM, "--tokperf-client-procs", "2")
    result.assert_outcomes(passed=1)
    test = _tests(pytester)["test_one_stream"]
    assert test["concurrency"] == 1 and len(test["client_procs"]) <= 1


# --- 10. a dead engine fails even an unmarked test -----------------------------------

UNMARKED = """
def test_unmarked(tokperf):
    tokperf.run(requests=3, max_tokens=16, warmup=0)
"""


def test_a_crashed_engine_fails_a_test_without_markers(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")
    from pytest_tokperf.engines.child import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "SIGSEGV@20")
    pytester.makepyfile(test_crash=UNMARKED)
    result = pytester.runpytest(*QUIET, "--tokperf-json", "out.json")
    result.assert_outcomes(failed=1)
    test = _tests(pytester)["test_unmarked"]
    assert test["verdict"] == "FAIL" and test["failed"] >= 1
    result.stdout.fnmatch_lines(["*died with SIGSEGV*"])


# --- 11. every run of a test is judged -------------------------------------------------

TWO_RUNS = """
import pytest

@pytest.mark.throughput_floor(per_gpu=1)
def test_two_runs(tokperf):
    first = tokperf.run(requests=4, max_tokens=50)   # longer than the model: all fail
    assert first.failed == 4
    tokperf.run(requests=12, max_tokens=4)

def test_allowed(tokperf):
    tokperf.run(requests=4, max_tokens=50, allow_failures=4)
"""


def test_a_failed_earlier_run_fails_the_test_and_is_reported(pytester: pytest.Pytester) -> None:
    _profile(pytester, '[profiles.short]\nextends = "sim"\nengine = { max_model_len = 20 }\n')
    pytester.makepyfile(test_runs=TWO_RUNS)
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "short", "--tokperf-json", "out.json")
    result.assert_outcomes(passed=1, failed=1)
    tests = _tests(pytester)
    test = tests["test_two_runs"]
    assert test["verdict"] == "FAIL"
    assert [(r["requests"], r["failed"]) for r in test["runs"]] == [(4, 4), (12, 0)]
    result.stdout.fnmatch_lines(["*run 1 of 2: 4 requests failed (none may fail)*"])
    assert tests["test_allowed"]["verdict"] == "MEASURED"


# --- 12. the smaller silent no-ops ------------------------------------------------------


def _doc(verdict: str, rate: float) -> dict:
    test = {
        "nodeid": "t.py::test_a",
        "verdict": verdict,
        "profile": "sim",
        "tokens_per_s": rate,
        "engine": {"devices": 1},
        **{k: {"p99": 0.1, "p50": 0.05} for k in ("ttft_s", "tpot_s", "e2e_s")},
    }
    return {"tests": [test]}


def test_calibrate_proposes_from_passing_and_measured_runs_only() -> None:
    good = [_doc("PASS", 100.0), _doc("MEASURED", 101.0), _doc("PASS", 99.0)]
    bad = [_doc("FAIL", 1.0), _doc("INVALID", 2.0)]
    (only_good,) = calibrate.propose(good, 0.95, 0.9)
    (mixed,) = calibrate.propose([*good, *bad], 0.95, 0.9)
    assert mixed.tokens_per_s == only_good.tokens_per_s == (100.0, 101.0, 99.0)


def test_a_misspelled_environment_variable_warns_with_the_closest_name(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKPERF_CONFIDNCE", "0.9")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "sim")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*unknown environment variable TOKPERF_CONFIDNCE*did you mean TOKPERF_CONFIDENCE*"]
    )


def test_nvml_that_fails_beside_nvidia_device_files_is_an_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pytest_tokperf.hardware import inventory

    recording = tmp_path / "mismatch.json"
    recording.write_text(json.dumps({"init_error": "Driver/library version mismatch", "gpus": []}))
    (tmp_path / "nvidia0").write_text("")
    monkeypatch.setenv("TOKPERF_NVML_RECORDING", str(recording))
    monkeypatch.setattr(inventory, "DEVICE_FILES", str(tmp_path / "nvidia[0-9]*"))
    pytester.makepyfile("def test_gpus(tokperf_gpus): pass")
    result = pytester.runpytest(*QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*NVML*version mismatch*nvidia0*--tokperf-profile cpu*"])
    chosen = pytester.runpytest(*QUIET, "--tokperf-profile", "sim")
    chosen.assert_outcomes(passed=1)  # the CPU on purpose


OPENAI_PROFILE = """
[profiles.served8]
extends = "h100-sxm"
backend = "openai"
"""
SERVED = """
def test_served(tokperf):
    tokperf.run(requests=2, max_tokens=4, warmup=0, workload="prompts.jsonl")
"""


def test_openai_per_gpu_divides_by_the_servers_gpus_not_the_clients(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("aiohttp", reason="needs the 'openai' extra")
    from pytest_tokperf import launcher

    fake = Path(__file__).parents[1] / "engine" / "fake_openai_server.py"
    server = launcher.start(f"{sys.executable} {fake} --port {{port}}", ready_timeout_s=60)
    try:
        monkeypatch.setenv("TOKPERF_NVML_RECORDING", str(DATA / "h100-sxm-8.json"))
        _profile(pytester, OPENAI_PROFILE)
        pytester.makefile(".jsonl", prompts=json.dumps({"id": "a", "prompt": "ok"}))
        pytester.makepyfile(test_served=SERVED)
        url = server.base_url
        result = pytester.runpytest(
            *QUIET,
            "--tokperf-profile",
            "served8",
            "--tokperf-base-url",
            url,
            "--tokperf-gpus",
            "1",
            "--tokperf-lock-dir",
            str(pytester.path / "locks"),
            "--tokperf-json",
            "out.json",
        )
        result.assert_outcomes(passed=1)
        test = _tests(pytester)["test_served"]
        assert test["engine"]["devices"] == 8
        assert test["tokens_per_s_per_gpu"] == pytest.approx(test["tokens_per_s"] / 8)
    finally:
        server.stop()
