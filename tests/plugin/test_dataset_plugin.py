"""A profile whose floors were measured on a dataset runs them on that dataset or not at all.

The GPU profiles' floors are MLPerf OpenOrca numbers; here a user profile on the sim
engine stands for them (`dataset = "mlperf-openorca"`), so the whole path runs on any
machine: the skip that says how to make the dataset, the error under
--tokperf-require-hardware, and the run on the converted file once it is given.
"""

from __future__ import annotations

import json

import pytest

PROFILE = """
[profiles.orca-sim]
extends = "sim"
dataset = "mlperf-openorca"
requests = 10  # an Offline floor's fewest
max_tokens = 4
"""

SUITE = """
import pytest

@pytest.mark.throughput_floor()
def test_default_floor():
    pass

def test_own_workload(tokperf, tmp_path):
    own = tmp_path / "own.jsonl"
    own.write_text('{"id": "a", "prompt": "mine"}\\n')
    result = tokperf.run(workload=own, requests=3)
    assert {r.id for r in result.records} == {"a", "a#1", "a#2"}
"""

ARGS = ("--tokperf-profile", "orca-sim", "-p", "no:cacheprovider", "--tokperf-json", "out.json")


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_without_the_dataset_the_default_run_skips_saying_how_to_make_it(suite) -> None:
    result = suite.runpytest(*ARGS, "-rs")
    # the test that names its own workload still runs; the default one never falls
    # back to the built-in prompts
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*profile 'orca-sim'*MLPerf OpenOrca*convert-openorca*"])
    doc = json.loads((suite.path / "out.json").read_text())
    skipped = [t for t in doc["tests"] if t["verdict"] == "SKIPPED"]
    assert [t["nodeid"] for t in skipped] == ["test_suite.py::test_default_floor"]
    assert "--tokperf-dataset PATH" in skipped[0]["reason"]


def test_require_hardware_makes_a_missing_dataset_an_error(suite) -> None:
    result = suite.runpytest(*ARGS, "--tokperf-require-hardware")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*MLPerf OpenOrca*(--tokperf-require-hardware)*"])


def test_the_given_dataset_is_what_a_default_run_measures(suite, monkeypatch) -> None:
    orca = suite.path / "openorca.jsonl"
    lines = [json.dumps({"id": f"orca-{i}", "prompt": f"q{i}", "reference": "r"}) for i in range(3)]
    orca.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("TOKPERF_DATASET", str(orca))
    result = suite.runpytest(*ARGS)
    result.assert_outcomes(passed=2)
    doc = json.loads((suite.path / "out.json").read_text())
    default = next(t for t in doc["tests"] if t["nodeid"].endswith("test_default_floor"))
    assert default["workload"] == str(orca) and default["requests"] == 10
    bad = suite.runpytest(*ARGS, "--tokperf-dataset", "nope.jsonl")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*dataset 'nope.jsonl' (from --tokperf-dataset) is not a file*"])
