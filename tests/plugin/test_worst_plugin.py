"""tokperf.search_worst on a sim engine whose TTFT grows with the prompt: hypothesis
shrinks to a prompt length within 10% of the analytic threshold.

Engine: TTFT 0.02 s + 0.1 ms per prompt token, no jitter, 32 slots (10 requests at
10 requests/s never queue). SLO TTFT p50 200 ms: a prompt breaks it from
(0.200 - 0.020) / 0.0001 = 1,800 tokens on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ARGS = ("-p", "no:cacheprovider", "--tokperf-profile", "simp", "--tokperf-json", "out.json", "-s")
PROFILE = """
[profiles.simp]
extends = "sim"
engine = { slots = 32, ttft_s = 0.02, prefill_s_per_token = 0.0001, jitter = 0.0 }
"""
SUITE = """
import json
from hypothesis import strategies as st

def test_worst(tokperf, tmp_path):
    found = tokperf.search_worst(
        {"ttft_p50_ms": 200}, prompt_tokens=st.integers(1, 4000), output_tokens=2, qps=10,
        requests=10, budget_s=90, max_examples=40, path=tmp_path / "worst.jsonl",
    )
    print("WORST", json.dumps(found.to_json()))
    assert found.shape is not None
"""
THRESHOLD = 1800


def test_search_worst_finds_the_prompt_threshold(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makepyfile(test_w=SUITE)
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(passed=1)
    (line,) = [line for line in result.outlines if "WORST " in line]
    found = json.loads(line.split("WORST ", 1)[1])
    shape = found["shape"]
    assert abs(shape["prompt_tokens"] / THRESHOLD - 1) <= 0.10, found
    assert shape["output_tokens"] == 2 and shape["qps"] == 10 and found["tried"] >= 2
    assert "ttft_p50_ms observed" in found["why"]
    # the workload file reproduces the shape; its sidecar says how to rerun it
    path = Path(found["workload"])
    (row,) = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert len(row["prompt"].split()) == shape["prompt_tokens"] and row["max_tokens"] == 2
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["rerun"].startswith("tokperf.run('server', requests=10, workload=")
