"""A crash of the embedded engine's child process fails one test, not the session."""

from __future__ import annotations

import json

import pytest

from pytest_tokperf.engines.child import FAULT_ENV

pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")

SUITE = """
import pytest

@pytest.mark.throughput_floor(per_gpu=0.05)
def test_a_crashes(tokperf):
    tokperf.run(requests=3, max_tokens=16, warmup=0)

@pytest.mark.throughput_floor(per_gpu=0.05)
def test_b_passes(tokperf):
    # a warm-up request: the new child's first answer is not in the measured window; 10
    # requests, the fewest an Offline floor is judged on
    result = tokperf.run(requests=10, max_tokens=8, warmup=1)
    assert result.failed == 0
"""


def test_a_crashed_engine_child_fails_that_test_and_the_next_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_crash=SUITE)
    # the documented test hook: the first engine child crashes itself after 20 tokens,
    # in the middle of test_a's second request
    monkeypatch.setenv(FAULT_ENV, "SIGSEGV@20")
    result = pytester.runpytest("-p", "no:cacheprovider", "--tokperf-json", "out.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "2 requests failed (none may fail) [[]profile cpu, engine llamacpp, *]",
            "  request default-00*: ChildDied: engine child process (pid *) died with SIGSEGV "
            "while running request 'default-00*'; last stderr lines (*stderr.log):",
            "Fatal Python error: Segmentation fault",
            "*FAILED test_crash.py::test_a_crashes*",
        ]
    )
    doc = json.loads((pytester.path / "out.json").read_text())
    tests = {t["nodeid"].split("::")[1]: t for t in doc["tests"]}
    assert tests["test_a_crashes"]["verdict"] == "FAIL"
    assert tests["test_b_passes"]["verdict"] == "PASS"
    errors = tests["test_a_crashes"]["errors"]
    assert len(errors) == 2 and all("died with SIGSEGV" in e for e in errors)


def test_a_truncated_model_file_is_a_clear_error_not_a_crash(pytester: pytest.Pytester) -> None:
    from pytest_tokperf.engines.llamacpp import shipped_model_path

    data = shipped_model_path().read_bytes()
    bad = pytester.path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    pytester.makepyfile(test_model=SUITE)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--tokperf-model-path", str(bad), timeout=300
    )
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [f"*tokperf could not load its engine: llama.cpp could not load {bad}: *"]
    )
    assert "Fatal Python error" not in result.stdout.str() + result.stderr.str()
