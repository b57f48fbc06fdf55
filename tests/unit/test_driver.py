"""The Offline driver against a scripted engine: timestamps, failures and time limits.

The scripted engine exists to inject what the real one cannot do on demand (fail in
the middle of a stream, hang); the real engine's path is in tests/engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import time
from collections.abc import AsyncIterator

import pytest

from pytest_tokperf.driver import Plan, RequestRecord, _Live, run, run_plan
from pytest_tokperf.engines import Chunk, EngineInfo, Request


class Scripted:
    """Streams `tokens` one-token chunks `gap_s` apart; a prompt can ask it to fail or hang."""

    info = EngineInfo("scripted", "m", "f16", 1)

    def __init__(self, gap_s: float = 0.001) -> None:
        self.gap_s = gap_s
        self.started: list[str] = []

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        self.started.append(request.id)
        for i in range(request.max_tokens):
            if request.prompt == "fail" and i == 2:
                raise RuntimeError("backend fell over")
            await asyncio.sleep(3600 if request.prompt == "hang" else self.gap_s)
            yield Chunk(1, f"t{i} ")

    async def aclose(self) -> None:
        pass


def test_offline_issues_everything_at_once_and_keeps_order() -> None:
    engine = Scripted()
    reqs = [Request(f"r{i}", "ok", 5) for i in range(6)]
    recs = run(engine, reqs, warmup=[Request("w", "ok", 2)])
    assert engine.started == ["w"] + [r.id for r in reqs]  # warm-up first, then measured
    assert [r.id for r in recs] == [r.id for r in reqs]  # warm-up is not recorded
    assert len({r.issue_ns for r in recs}) == 1
    for r in recs:
        assert r.ok and r.output_tokens == 5 and len(r.chunk_ns) == 5
        assert r.text == "t0 t1 t2 t3 t4 "
        assert r.issue_ns < r.chunk_ns[0] <= r.chunk_ns[-1] <= r.end_ns
        assert list(r.chunk_ns) == sorted(r.chunk_ns)


def test_a_failing_request_is_a_record_with_its_partial_output() -> None:
    recs = run(Scripted(), [Request("good", "ok", 4), Request("bad", "fail", 4)])
    good, bad = recs
    assert good.ok and good.output_tokens == 4
    assert bad.error == "RuntimeError: backend fell over"
    assert bad.output_tokens == 2 and bad.text == "t0 t1 "


def test_a_hanging_request_is_cut_at_the_time_limit() -> None:
    start = time.monotonic()
    recs = run(Scripted(), [Request("fine", "ok", 3), Request("stuck", "hang", 3)], timeout_s=0.3)
    assert time.monotonic() - start < 30  # generous: only "it did not hang"
    fine, stuck = recs
    assert fine.ok
    assert stuck.error is not None and "time limit" in stuck.error
    assert stuck.output_tokens == 0


def test_unknown_scenario() -> None:
    with pytest.raises(ValueError, match=r"unknown scenario .server. for driver\.run; available"):
        run(Scripted(), [Request("r", "ok", 1)], scenario="server")
    with pytest.raises(ValueError, match="unknown scenario 'batch'; available: offline, server"):
        run_plan(Scripted(), [Request("r", "ok", 1)], Plan("batch"))


def test_a_record_made_by_the_driver_is_a_real_record() -> None:
    # the driver fills a record's fields at once (cheaper than the frozen __init__):
    # it must equal, hash, pickle, replace and refuse assignment like one made normally
    live = _Live(Request("r1", "p", 4), 5, 3)
    live.chunk_ns.append(6)
    live.chunk_tokens.append(2)
    live.texts = ["ab"]
    live.token_ids = [7, 8]
    made = live.record(9, "boom")
    normal = RequestRecord("r1", 5, 9, tuple(live.chunk_ns), (2,), "ab", "boom", (7, 8), 3)
    assert made == normal and hash(made) == hash(normal) and repr(made) == repr(normal)
    assert pickle.loads(pickle.dumps(made)) == normal
    assert dataclasses.replace(made, error=None) == dataclasses.replace(normal, error=None)
    assert {f.name for f in dataclasses.fields(RequestRecord)} == set(vars(made))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.error = None  # type: ignore[misc]
