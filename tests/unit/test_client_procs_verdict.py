"""A saturated client process makes the run INVALID, naming it."""

from __future__ import annotations

import dataclasses

from pytest_tokperf import metrics, verdict
from pytest_tokperf.driver import ClientProc, RequestRecord
from pytest_tokperf.engines import EngineInfo

NS = 1_000_000_000


def _result(*cpus: float) -> metrics.RunResult:
    records = [
        RequestRecord(f"r{i}", i * NS, i * NS + NS, (i * NS + NS // 2,), (4,)) for i in range(10)
    ]
    result = metrics.summarize(
        records, EngineInfo("openai", "m", "served", 1), scenario="offline", workload="w",
        max_tokens=4,
    )  # fmt: skip
    procs = tuple(ClientProc(i + 1, 100 + i, 4, 16, cpu) for i, cpu in enumerate(cpus))
    return dataclasses.replace(result, client_procs=procs)


def test_a_saturated_client_process_is_named() -> None:
    outcome = verdict.judge(_result(0.4, 0.97), {"min_tokens_per_s": 1.0})
    assert outcome.status == "INVALID"
    (reason,) = outcome.invalid
    assert "client process 2 of 2 (pid 101) used 97% of a core" in reason


def test_busy_but_unsaturated_client_processes_judge_the_engine() -> None:
    assert verdict.judge(_result(0.5, 0.6), {"min_tokens_per_s": 1.0}).status == "PASS"
