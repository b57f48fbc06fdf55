"""Several client processes (--tokperf-client-procs) against the benchmarks' null server:
each process's records arrive, totals are exact, verdicts as with one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pytest_tokperf import driver, procs
from pytest_tokperf.engines import Request

pytest.importorskip("aiohttp", reason="needs the 'openai' extra")
NULL = Path(__file__).parents[2] / "benchmarks" / "null_openai_server.py"
SUITE = """
import pytest

@pytest.mark.throughput_floor(min_tokens_per_s=1)
def test_offline(tokperf):
    tokperf.run(requests=40, max_tokens=64, warmup=0)

@pytest.mark.throughput_floor(min_tokens_per_s=1e12)
def test_closed_loop(tokperf):
    tokperf.run("concurrency", concurrency=8, requests=40, max_tokens=64, warmup=0)
"""


def _run(pytester: pytest.Pytester, n: int) -> dict[str, dict]:  # type: ignore[type-arg]
    out = pytester.path / f"out{n}.json"
    result = pytester.runpytest(
        "--tokperf-engine=openai",
        # paced: the client stays far from saturation, so its verdicts are the engine's
        f"--tokperf-server-cmd={sys.executable} {NULL} --port {{port}} --pace-ms 5",
        f"--tokperf-client-procs={n}",
        f"--tokperf-json={out}",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, failed=1)
    return {p["nodeid"]: p for p in json.loads(out.read_text())["tests"]}


def test_two_client_processes_record_everything_and_judge_alike(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SUITE)
    one, two = _run(pytester, 1), _run(pytester, 2)
    assert {k: p["verdict"] for k, p in one.items()} == {k: p["verdict"] for k, p in two.items()}
    verdicts = {k.split("::")[-1]: p["verdict"] for k, p in two.items()}
    assert verdicts["test_offline"] == "PASS"
    # an impossible floor never passes: 40 closed-loop requests may give too few
    # independent batch windows for an interval (INCONCLUSIVE), else the interval FAILs
    assert verdicts["test_closed_loop"] in ("FAIL", "INCONCLUSIVE")
    for payload in two.values():
        shares = payload["client_procs"]
        assert [s["index"] for s in shares] == [1, 2] and len({s["pid"] for s in shares}) == 2
        assert [s["requests"] for s in shares] == [20, 20]
        assert sum(s["output_tokens"] for s in shares) == payload["output_tokens"] == 40 * 64
        assert payload["requests"] == 40 and payload["failed"] == 0
        # each process's driver CPU in seconds too: client CPU per token = sum / tokens
        assert all(0 < s["cpu_s"] < 60 for s in shares)
    assert all(p["client_procs"] == [] for p in one.values())


def test_the_poisson_schedule_is_one_seeded_schedule_dealt_out() -> None:
    reqs = [Request(f"r{i}", "x", 8) for i in range(101)]
    plan = driver.Plan("server", qps=20.0, seed=7, concurrency=None)
    parts = procs.shares(reqs, plan, 3)
    whole = sorted(o for _, p in parts for o in p.offsets_ns or ())
    expected = [o for o, _ in zip(driver.poisson_offsets_ns(20.0, 7), range(101), strict=False)]
    assert whole == expected
    assert sorted(r.id for share, _ in parts for r in share) == sorted(r.id for r in reqs)
    assert [len(share) for share, _ in parts] == [34, 34, 33]


def test_concurrency_is_split_and_auto_follows_the_offered_load() -> None:
    plan = driver.Plan("concurrency", concurrency=5)
    reqs = [Request(f"r{i}", "x", 8) for i in range(10)]
    assert [p.concurrency for _, p in procs.shares(reqs, plan, 2)] == [3, 2]
    assert procs.auto_count(None) == 1
    # 1.1M tokens/s at 15 us/token, half a core each: 33 processes, capped by the cores
    assert procs.auto_count(1_100_000, cpus=64) == 33
    assert procs.auto_count(1_100_000, cpus=16) == 15


def test_auto_plans_for_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned to 4 of 64 cores (as the GPU-day clients are, beside the server's cores),
    auto plans for those 4, not for every core of the machine."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert procs.usable_cores() == 4
    assert procs.auto_count(1_100_000) == 3


def test_answers_larger_than_a_pipe_arrive_whole() -> None:
    """Looks and results of hundreds of KB (a pipe holds 64 KB): uvloop's reader on the
    child's end of the pipe had made it non-blocking, so a large send broke off half
    written ("got end of file during message" in the parent)."""
    from pytest_tokperf import launcher

    server = launcher.start(f"{sys.executable} {NULL} --port {{port}}", ready_timeout_s=60)
    try:
        spawn = procs.Spawn("openai", {"base_url": server.base_url}, 1)
        reqs = [Request(f"r{i}", "x", 256) for i in range(1200)]
        plan = driver.Plan("concurrency", concurrency=16, texts=False, look_every_s=0.05)
        looks: list[int] = []
        driven = procs.run(spawn, reqs, plan, 2, progress=lambda recs, s: looks.append(len(recs)))
    finally:
        server.stop()
    assert len(driven.records) == 1200 and all(r.ok for r in driven.records)
    assert sum(r.output_tokens for r in driven.records) == 1200 * 256
    assert looks and max(looks) > 50  # the looks carried records too
    used = [p.cpu_s for p in driven.procs]
    assert all(u is not None and u > 0 for u in used) and driven.client_cpu_s == sum(used)
