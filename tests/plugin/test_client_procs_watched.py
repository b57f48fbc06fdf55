"""Several client processes (--tokperf-client-procs) watched as one: the live line and
sequential early stopping work on records merged from every process, exactly.

The sim engine (no server) keeps these runs to seconds; the null-server runs are in
test_client_procs.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from pytest_tokperf import driver, procs
from pytest_tokperf.engines import Request

SIM = ("--tokperf-profile", "sim", "-p", "no:cacheprovider", "--tokperf-json", "out.json")
WATCHED = """
import pytest

@pytest.mark.throughput_floor(min_tokens_per_s={"sim": 1})
def test_clearly_fast(tokperf):
    result = tokperf.run("concurrency", concurrency=4, max_duration_s=32, max_tokens=8)
    assert result.stopped.startswith("early stop after")

def test_long(tokperf):
    tokperf.run("concurrency", concurrency=2, duration_s=3.6, max_tokens=8)
"""


def test_two_client_processes_show_progress_and_stop_early(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_watched=WATCHED)
    result = pytester.runpytest(*SIM, "--tokperf-client-procs=2")
    result.assert_outcomes(passed=2)
    tests = {
        p["nodeid"].split("::")[-1]: p
        for p in json.loads((pytester.path / "out.json").read_text())["tests"]
    }
    fast = tests["test_clearly_fast"]
    assert fast["stopped"].startswith("early stop after"), fast["stopped"]
    # looks at 2, 4, 8 and 16 s: the verdict came at a look, not at the 32 s maximum
    assert fast["looks"] == 5 and fast["duration_s"] < 32 / 2
    assert [s["index"] for s in fast["client_procs"]] == [1, 2]
    assert sum(s["output_tokens"] for s in fast["client_procs"]) == fast["output_tokens"]
    assert [s["index"] for s in tests["test_long"]["client_procs"]] == [1, 2]
    result.stdout.fnmatch_lines(["tokperf: * s, */* requests done, * tokens/s (95% CI *-*)"])


def test_the_looks_merge_every_process_exactly_and_the_stop_reaches_all() -> None:
    spawn = procs.Spawn("sim", {"tokens_per_s": 200.0, "ttft_s": 0.01, "slots": 4}, 1)
    reqs = [Request(f"r{i}", "x", 8) for i in range(2000)]
    plan = driver.Plan(
        "concurrency", concurrency=4, max_duration_s=60, look_every_s=0.05, min_requests=12
    )
    looked: list[list[driver.RequestRecord]] = []
    decided: list[list[driver.RequestRecord]] = []

    def progress(snapshot: Sequence[driver.RequestRecord], elapsed_s: float) -> None:
        looked.append(list(snapshot))

    def stop(snapshot: Sequence[driver.RequestRecord], elapsed_s: float) -> bool:
        decided.append(list(snapshot))
        return True

    driven = procs.run(spawn, reqs, plan, 2, stop=stop, progress=progress)
    assert driven.stopped.startswith("early stop after"), driven.stopped
    assert driven.window_end_ns is not None
    assert len(driven.records) < len(reqs)  # both processes stopped issuing
    # requests are dealt round-robin: even ids to process 1, odd ids to process 2
    assert [p.requests for p in driven.procs] == [
        sum(1 for r in driven.records if int(r.id[1:]) % 2 == k) for k in (0, 1)
    ]
    (snapshot,) = decided  # asked once the minimums were met, then stopped
    assert looked[-1] == snapshot  # the live line saw what the rule saw
    ids = [r.id for r in snapshot]
    assert len(set(ids)) == len(ids)
    assert {int(i[1:]) % 2 for i in ids} == {0, 1}  # both processes' requests
    assert [r.issue_ns for r in snapshot] == sorted(r.issue_ns for r in snapshot)
    # exact: a finished request is its final record; one in flight, a prefix of it
    final = {r.id: r for r in driven.records}
    for r in snapshot:
        end = final[r.id]
        assert r.issue_ns == end.issue_ns
        assert r.chunk_ns == end.chunk_ns[: len(r.chunk_ns)]
        assert r.chunk_tokens == end.chunk_tokens[: len(r.chunk_tokens)]
    assert sum(1 for r in snapshot if final[r.id] == r) >= 12
    assert any(final[r.id] != r for r in snapshot)  # requests in flight were in it too
