"""Without MPI: records files, recompute, merge of nodes run apart, per_rack alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pytest_tokperf import records
from pytest_tokperf.driver import RequestRecord

QUIET = ("-p", "no:cacheprovider")
SIM = """
[tool.tokperf.profiles.rack-sim]
extends = "sim"
requests = 16
max_tokens = 16
warmup = 0
engine = { jitter = 0.0, time_scale = 4.0, chunk_tokens = 2 }
"""
SUITE = """
import pytest

@pytest.mark.throughput_floor(per_gpu=1.0)
def test_node(tokperf):
    tokperf.run()
    tokperf.run(scenario="concurrency", concurrency=2, requests=6)

@pytest.mark.throughput_floor(per_gpu=1.0)
def test_merged_node(tokperf):
    tokperf.run()  # 16 requests: an Offline interval of its own, so each node decides

@pytest.mark.throughput_floor(per_rack=10.0)
def test_rack_alone(tokperf):
    tokperf.run()
"""


def test_rows_carry_wall_clock_times_and_read_back_exactly() -> None:
    anchor = records.Anchor(wall_ns=1_700_000_000_000_000_000, perf_ns=5_000)
    record = RequestRecord("a", 6_000, 9_000, (7_000, 8_000), (1, 3), scheduled_ns=5_500)
    (row,) = records.to_rows([record], anchor, "t::x", 0, "host")
    assert row["issue"] == 1_700_000_000_000_001_000 and row["first"] == row["chunks"][0]
    assert row["tokens"] == 4 and row["chunk_tokens"] == [1, 3] and row["error"] is None
    back = records.record(json.loads(json.dumps(row)))
    shift = anchor.wall_ns - anchor.perf_ns
    assert back.issue_ns - shift == record.issue_ns and back.end_ns - shift == record.end_ns
    assert back.chunk_tokens == record.chunk_tokens and back.scheduled_ns == 5_500 + shift
    bare = {**row, "chunks": None}
    assert records.record(bare).chunk_tokens == (1, 3)  # first token, then the rest at the end


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for name in ("TOKPERF_PROFILE", "TOKPERF_NVML_RECORDING", "TOKPERF_RECORDS", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    pytester.makefile(".toml", pyproject=SIM)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_records_recompute_to_the_json_and_per_rack_alone_skips(suite: pytest.Pytester) -> None:
    result = suite.runpytest(
        *QUIET,
        "test_suite.py::test_node",
        "test_suite.py::test_rack_alone",
        "--tokperf-profile",
        "rack-sim",
        "-rs",
        "--tokperf-json",
        "out.json",
        "--tokperf-records",
        "rec.jsonl",
        # 6 concurrency requests give too few batch windows for an interval: this test is
        # about the records, not the verdict
        "--tokperf-inconclusive",
        "pass",
    )
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * throughput_floor(per_rack=...) needs every node*"])
    rows = records.read_rows(suite.path / "rec.jsonl")
    assert [r["run"] for r in rows] == [0] * 16 + [1] * 6
    assert {r["test"] for r in rows} == {"test_suite.py::test_node"}
    cli = [sys.executable, "-m", "pytest_tokperf"]
    done = subprocess.run(
        [*cli, "recompute", "rec.jsonl", "--json", "out.json"],
        cwd=suite.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every last run matches the JSON" in done.stdout
    # a tampered record no longer matches
    rows[-1].update(tokens=rows[-1]["tokens"] + 1, chunks=None)
    (suite.path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run(
        [*cli, "recompute", "bad.jsonl", "--json", "out.json"],
        cwd=suite.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "MISMATCH" in done.stdout


def test_merge_judges_nodes_that_ran_as_separate_jobs(suite: pytest.Pytester) -> None:
    """Three plain pytest processes started together, merged afterwards."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                *QUIET,
                "-q",
                "test_suite.py::test_merged_node",
                "--tokperf-profile",
                "rack-sim",
                "--tokperf-json",
                f"node{i}.json",
                "--tokperf-records",
                f"node{i}.jsonl",
            ],
            cwd=suite.path,
            stdout=subprocess.DEVNULL,
        )
        for i in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    files = [f"node{i}.json" for i in range(3)]
    cli = [sys.executable, "-m", "pytest_tokperf", "merge", *files, "--out", "rack.json"]
    done = subprocess.run(
        [*cli, "--per-rack", "1"], cwd=suite.path, capture_output=True, text=True, check=False
    )
    doc = json.loads((suite.path / "rack.json").read_text())
    (rack,) = [t for t in doc["tests"] if t["kind"] == "rack"]
    nodes = [json.loads((suite.path / f).read_text())["tests"][0] for f in files]
    assert [n["verdict"] for n in nodes] == ["PASS"] * 3  # each node decided its own floor
    if rack["verdict"] == "INVALID":  # started by a loaded machine too far apart
        assert "ran together for" in rack["invalid"][0] and done.returncode == 1
        return
    assert done.returncode == 0, done.stdout + done.stderr
    assert rack["verdict"] == "PASS" and len(rack["rack"]["nodes"]) == 3
    # the merged rate counts inside the common window only: at most the sum of the nodes'
    assert rack["tokens_per_s"] <= sum(n["tokens_per_s"] for n in nodes) * 1.01
    assert rack["tokens_per_s"] >= sum(n["tokens_per_s"] for n in nodes) * 0.8
    assert "test_suite.py::test_merged_node  rack" in done.stdout
    done = subprocess.run(
        [*cli, "--per-rack", str(rack["tokens_per_s"] * 2)],
        cwd=suite.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "< floor" in done.stdout
