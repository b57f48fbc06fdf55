"""Whole test files run through pytest (pytester) on the real embedded model."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from pytest_tokperf.report import num

# small runs keep these tests quick: 10 requests (an Offline floor's fewest) of at most 8
# new tokens, 1 warm-up
SMALL = ("--tokperf-requests", "10", "--tokperf-max-tokens", "8", "-p", "no:cacheprovider")

SUITE = """
import pytest

@pytest.mark.throughput_floor(per_gpu=0.05)
def test_reachable(tokperf):
    result = tokperf.run(warmup=1)
    assert result.requests == 10 and result.failed == 0

@pytest.mark.throughput_floor(min_tokens_per_s=1e9)
def test_impossible(tokperf):
    tokperf.run(warmup=1)

@pytest.mark.throughput_floor(per_gpu={"gb300-nvl72": 15_200})
def test_rack_only(tokperf):
    raise AssertionError("must not run on the cpu profile")
"""

# what SUITE's three tests come to on the cpu profile
SUITE_SUMMARY = {
    "PASS": 1, "FAIL": 1, "INCONCLUSIVE": 0, "INVALID": 0, "MEASURED": 0, "SKIPPED": 1,
    "ACKNOWLEDGED": 0,
}  # fmt: skip

FAIL_LINE = re.compile(
    r"offline output tokens/s (?P<observed>[\d,.]+) \(95% CI [\d,.-]+\) < floor 1,000,000,000 "
    r"\[profile cpu, engine llamacpp, model SmolLM2-135M-Instruct q4_1, 1 device, 10 requests\]"
)


def test_floors_gate_the_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    # the whole table: the narrow one's columns depend on how wide the timings print
    result = pytester.runpytest(*SMALL, "-rs", "--tokperf-json", "out.json", "--junitxml",
                                "junit.xml", "--tokperf-table", "wide")  # fmt: skip
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "tokperf: profile cpu (default), engine llamacpp, model SmolLM2-135M-Instruct q4_1, "
            "1 device",
            "*= tokperf =*",
            "test * scenario * requests * tokens/s * per device * floor * TTFT p99 * verdict",
            "test_suite.py::test_impossible * offline * 10 * 1,000,000,000 * FAIL*",
            "test_suite.py::test_rack_only * SKIPPED",
            "test_suite.py::test_reachable * offline * 10 * 0.05/dev * PASS*",
        ]
    )
    match = FAIL_LINE.search(result.stdout.str())
    assert match is not None, result.stdout.str()
    result.stdout.fnmatch_lines(["*SKIPPED*sets no floor for profile 'cpu'*"])

    doc = json.loads((pytester.path / "out.json").read_text())
    assert doc["summary"] == SUITE_SUMMARY
    tests = {t["nodeid"].split("::")[1]: t for t in doc["tests"]}
    for name in ("test_reachable", "test_impossible"):
        t = tests[name]
        # the rate is what the plugin says it is: tokens over the first-issue..last-end span
        assert t["tokens_per_s"] == pytest.approx(t["output_tokens"] / t["duration_s"])
        assert 0 < t["output_tokens"] <= 10 * 8
        assert t["engine"]["devices"] == 1 and t["engine"]["precision"] == "q4_1"
    assert num(tests["test_impossible"]["tokens_per_s"]) == match["observed"]
    check = tests["test_impossible"]["checks"][1]
    assert check["ci_low"] <= check["observed"] <= check["ci_high"] < 1e9
    assert check == {
        "metric": "min_tokens_per_s",
        "observed": tests["test_impossible"]["tokens_per_s"],
        "limit": 1e9,
        "passed": False,
        "status": "FAIL",
        "ci_low": check["ci_low"],
        "ci_high": check["ci_high"],
        "confidence": 0.95,  # the interval's own confidence (one look)
        "batches": 10,  # an Offline run's fixed windows
        "count": None,  # the SLO keys: none for a floor
        "over": None,
        "needed": None,
        "estimate": None,
        "kind": "floor",  # where the evidence comes from
        "run": None,  # the floors judge the test's last run
        "runs": 1,
        "detail": "",
    }
    (run,) = tests["test_impossible"]["runs"]  # every run of the test, each in a line
    for key in ("scenario", "requests", "failed", "output_tokens", "tokens_per_s"):
        assert run[key] == tests["test_impossible"][key]
    assert tests["test_rack_only"]["reason"].startswith("throughput_floor(per_gpu=...)")

    junit = ET.parse(pytester.path / "junit.xml")
    props = {
        case.get("name"): json.loads(prop.get("value"))
        for case in junit.iter("testcase")
        for prop in case.iter("property")
        if prop.get("name") == "tokperf"
    }
    assert props["test_impossible"]["verdict"] == "FAIL"


def test_a_marked_test_without_a_run_gets_the_default_workload(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.throughput_floor()  # no bounds: the profile's default floor
        def test_default():
            pass
        """
    )
    result = pytester.runpytest(*SMALL, "--tokperf-json", "out.json")
    (test,) = json.loads((pytester.path / "out.json").read_text())["tests"]
    assert test["requests"] == 10 and test["workload"] == "default"
    assert test["floors"] == {"per_gpu": 5.0}
    # the verdict follows the interval, whatever this (noisy, shared) machine reached:
    # PASS above the floor, FAIL below it, INCONCLUSIVE (fails by default) astride it
    (check,) = [c for c in test["checks"] if c["metric"] == "per_gpu"]
    assert check["observed"] == test["tokens_per_s_per_gpu"]
    low, high = check["ci_low"], check["ci_high"]
    if low is None:  # no interval: nothing is decided
        expected = "INCONCLUSIVE"
    else:
        expected = "PASS" if low >= 5.0 else "FAIL" if high < 5.0 else "INCONCLUSIVE"
    assert test["verdict"] == check["status"] == expected
    result.assert_outcomes(passed=int(expected == "PASS"), failed=int(expected != "PASS"))


def test_the_body_failing_is_the_outcome(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.throughput_floor(per_gpu=1e9)
        def test_body(tokperf):
            assert 1 == 2, "the body's own failure"
        """
    )
    result = pytester.runpytest(*SMALL)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the body's own failure*"])
    result.stdout.no_fnmatch_line("*< floor*")


@pytest.mark.parametrize(
    ("marker", "says"),
    [
        ("throughput_floor(15200)", "got positional arguments [15200]"),
        ("throughput_floor(per_gpus=1)", "unknown keywords per_gpus"),
        ("throughput_floor(per_gpu=0)", "a floor must be a positive number, got 0"),
        ("throughput_floor(per_gpu={'gb300': 1})", "unknown profiles gb300; known profiles"),
    ],
)
def test_bad_marker_arguments_are_usage_errors(
    pytester: pytest.Pytester, marker: str, says: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.{marker}
        def test_marked():
            pass
        """
    )
    result = pytester.runpytest(*SMALL)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "ERROR: test_bad_marker_arguments_are_usage_errors.py::test_marked: " in result.stderr.str()
    )
    assert says in result.stderr.str()


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (
            ["--tokperf-profile", "tpu"],
            {},
            "unknown tokperf profile 'tpu' (from --tokperf-profile)",
        ),
        ([], {"TOKPERF_PROFILE": "tpu"}, "(from environment variable TOKPERF_PROFILE)"),
        (["--tokperf-requests", "0"], {}, "--tokperf-requests must be a positive integer"),
        ([], {"TOKPERF_MAX_TOKENS": "x"}, "environment variable TOKPERF_MAX_TOKENS must be"),
        (["--tokperf-model-path", "nope.gguf"], {}, "model file 'nope.gguf'"),
        (["--tokperf-engine", "vllm"], {}, "unknown engine 'vllm' (from --tokperf-engine)"),
        (["--tokperf-gpus", "0"], {}, "--tokperf-gpus must be a positive integer, got '0'"),
        (
            [],
            {"TOKPERF_ALLOW_BUSY_GPUS": "maybe"},
            "environment variable TOKPERF_ALLOW_BUSY_GPUS must be true or false",
        ),
        (
            ["--tokperf-table", "narrow"],
            {},
            "--tokperf-table must be one of auto, wide, got 'narrow'",
        ),
        (
            [],
            {"TOKPERF_TABLE": "full"},
            "environment variable TOKPERF_TABLE must be one of auto, wide",
        ),
    ],
)
def test_bad_options_are_usage_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args, env, says
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: *{says}*"])


def test_ini_profile_is_named_in_errors(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntokperf_profile = cpuu\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *'cpuu' (from ini option tokperf_profile in *tox.ini)*"])


def test_xdist_gives_the_same_verdicts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess(*SMALL, "-n", "2", "--tokperf-json", "out.json")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    assert FAIL_LINE.search(result.stdout.str()) is not None
    result.stdout.fnmatch_lines(["*= tokperf =*", "*test_reachable * PASS*"])  # ids fitted
    doc = json.loads((pytester.path / "out.json").read_text())
    assert doc["summary"] == SUITE_SUMMARY
    # each worker had its own engine, given one of the two cores
    threads = {t["engine"]["settings"]["n_threads"] for t in doc["tests"] if "engine" in t}
    assert threads == {1}


def test_model_path_points_the_engine_at_another_gguf(pytester: pytest.Pytester) -> None:
    from pytest_tokperf.engines.llamacpp import shipped_model_path

    own = pytester.path / "my-model.gguf"
    own.symlink_to(shipped_model_path())
    pytester.makepyfile(
        """
        def test_info(tokperf_engine):
            assert tokperf_engine.info.model == "my-model"
            assert tokperf_engine.info.settings["model_path"].endswith("my-model.gguf")
        """
    )
    result = pytester.runpytest("--tokperf-model-path", str(own))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["tokperf: profile cpu (default), engine llamacpp, model my-model.gguf*"]
    )
