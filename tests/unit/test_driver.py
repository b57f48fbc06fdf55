"""The Offline driver against a scripted engine: timestamps, failures and time limits.

The scripted engine exists to inject what the real one cannot do on demand (fail in
the middle of a stream, hang); the real engine's path is in tests/engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import pickle
import time
from collections.abc import AsyncIterator

import pytest

from pytest_tokperf.driver import Plan, RequestRecord, run, run_plan
from pytest_tokperf.engines import Chunk, Completion, EngineInfo, Request
from pytest_tokperf.flights import Live


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
    live = Live(Request("r1", "p", 4), 5, 3)
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


class Reads:
    """A ReadEngine that streams `max_tokens` one-event reads 1 ms apart and [DONE] in
    a read of its own, reports that read as the end, and defers its count (`count_s`
    long, blocking, as a tokenize round trip is) to a closure returning `factor` x."""

    info = EngineInfo("reads", "m", "f16", 1)

    def __init__(self, count_s: float = 0.0, factor: int = 1, fail: bool = False) -> None:
        self.count_s, self.factor, self.fail = count_s, factor, fail
        self.ends: dict[str, int] = {}
        self.counted: list[str] = []

    async def stream_reads(
        self, request: Request, times: list[int], counts: list[int], texts: bool
    ) -> Completion:
        for _ in range(request.max_tokens):
            await asyncio.sleep(0.001)
            times.append(time.perf_counter_ns())
            counts.append(1)
        await asyncio.sleep(0.001)
        times.append(time.perf_counter_ns())
        counts.append(1)  # [DONE]
        self.ends[request.id] = end = time.perf_counter_ns()

        def count() -> int:
            time.sleep(self.count_s)
            self.counted.append(request.id)
            if self.fail:
                raise RuntimeError("tokenize endpoint answered 500")
            return request.max_tokens * self.factor

        return Completion(None, 1, "", "tokenizer T", end, count)

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        raise NotImplementedError
        yield Chunk(0)

    async def aclose(self) -> None:
        pass


def test_a_deferred_count_waits_for_the_end_of_the_run_and_the_end_is_the_engines() -> None:
    engine = Reads(count_s=0.2, factor=2)
    reqs = [Request(f"r{i}", "ok", 4) for i in range(3)]
    driven = run_plan(engine, reqs, Plan("concurrency", concurrency=1))
    recs = driven.records
    for rec in recs:  # the end the engine stamped in the read that ended the stream
        assert rec.ok and rec.end_ns == engine.ends[rec.id]
        assert rec.output_tokens == 8 and len(rec.chunk_ns) == 4  # settled to the count
    for before, after in itertools.pairwise(recs):
        # the closed loop issued the next request at once, not after a 0.2 s count
        assert after.issue_ns - before.end_ns < 50_000_000
    assert engine.counted == ["r0", "r1", "r2"]
    assert dict(driven.token_counting) == {"tokenizer T": 3}


def test_a_deferred_count_that_fails_fails_its_request() -> None:
    driven = run_plan(Reads(fail=True), [Request("r", "ok", 3)], Plan("offline"))
    (rec,) = driven.records
    assert rec.error == "RuntimeError: tokenize endpoint answered 500"
    assert rec.output_tokens == 3  # the events, as the count never came
    assert dict(driven.token_counting) == {}
