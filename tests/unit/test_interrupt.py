"""Ctrl-C during a run: issuing stops, what finished is kept, a second Ctrl-C is at once.

The signal is real (`signal.raise_signal` in this process, from the event loop, once
some requests have finished); assertions are on the records, never on durations.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator

import pytest

from pytest_tokperf import driver
from pytest_tokperf.engines import Chunk, EngineInfo, Request


class Steady:
    """Each request streams `max_tokens` chunks 5 ms apart; the n-th finished request
    (n = `signal_after`) raises SIGINT in this process. A `stubborn` engine ignores
    the cancellation that follows and raises SIGINT once more (a second Ctrl-C)."""

    info = EngineInfo("steady", "m", "f16", 1)

    def __init__(self, signal_after: int, stubborn: bool = False) -> None:
        self.finished = 0
        self.signal_after = signal_after
        self.stubborn = stubborn

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        try:
            for _ in range(request.max_tokens):
                await asyncio.sleep(0.005)
                yield Chunk(1, "x")
        except asyncio.CancelledError:
            if not self.stubborn:
                raise
            asyncio.get_running_loop().call_later(0.05, signal.raise_signal, signal.SIGINT)
            await asyncio.sleep(3600)  # a hung engine: only the second Ctrl-C ends this
        self.finished += 1
        if self.finished == self.signal_after:
            signal.raise_signal(signal.SIGINT)

    async def aclose(self) -> None:
        pass


def reqs(n: int, tokens: int = 4) -> Iterator[Request]:
    return (Request(f"r{i}", "p", tokens) for i in range(n))


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """The standard loop and uvloop (the driver's choice where it is installed), with
    SIGINT handled as in a terminal (also when this run was started with it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="needs the 'openai' extra")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    yield loop
    loop.close()
    # whatever happened, Python's own handler is back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "plan",
    [
        driver.Plan("concurrency", concurrency=2),
        driver.Plan("server", qps=400.0),
    ],
    ids=lambda p: p.scenario,
)
def test_sigint_stops_issuing_and_keeps_what_finished(
    loop: asyncio.AbstractEventLoop, plan: driver.Plan
) -> None:
    engine = Steady(signal_after=3)
    with pytest.raises(driver.Interrupted) as caught:
        driver.run_plan(engine, reqs(1000), plan, loop=loop)
    driven = caught.value.driven
    assert isinstance(caught.value, KeyboardInterrupt)
    assert driven.stopped == driver.INTERRUPTED == str(caught.value)
    ok = [r for r in driven.records if r.ok]
    cut = [r for r in driven.records if not r.ok]
    assert len(ok) >= 3 and all(r.output_tokens == 4 for r in ok)
    assert len(driven.records) < 100  # issuing stopped long before the 1,000 requests
    assert all(r.error == "interrupted (SIGINT) before this request completed" for r in cut)


def test_offline_cuts_the_requests_in_flight(loop: asyncio.AbstractEventLoop) -> None:
    engine = Steady(signal_after=1)
    requests = [Request("short", "p", 2), *(Request(f"long{i}", "p", 400) for i in range(3))]
    with pytest.raises(driver.Interrupted) as caught:
        driver.run_plan(engine, requests, driver.Plan("offline"), loop=loop)
    records = {r.id: r for r in caught.value.driven.records}
    assert records["short"].ok and records["short"].output_tokens == 2
    assert all(not records[f"long{i}"].ok for i in range(3))
    assert all(0 < records[f"long{i}"].output_tokens < 400 for i in range(3))


def test_sigint_in_the_warm_up_measures_nothing(loop: asyncio.AbstractEventLoop) -> None:
    engine = Steady(signal_after=1)
    warm = [Request("w0", "p", 1), Request("w1", "p", 400)]
    with pytest.raises(driver.Interrupted) as caught:
        driver.run_plan(engine, reqs(5), driver.Plan("offline"), warmup=warm, loop=loop)
    assert caught.value.driven.records == ()
    assert caught.value.driven.stopped == "interrupted (SIGINT) during the warm-up"


def test_a_second_sigint_interrupts_a_hung_run_at_once(loop: asyncio.AbstractEventLoop) -> None:
    engine = Steady(signal_after=1, stubborn=True)  # the long request in flight hangs
    requests = [Request("short", "p", 1), Request("long", "p", 400)]
    with pytest.raises(KeyboardInterrupt) as caught:
        driver.run_plan(engine, requests, driver.Plan("concurrency", concurrency=2), loop=loop)
    assert not isinstance(caught.value, driver.Interrupted)
    for task in asyncio.all_tasks(loop):  # what the plain KeyboardInterrupt left behind
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))


def test_an_uninterrupted_run_returns_as_before(loop: asyncio.AbstractEventLoop) -> None:
    driven = driver.run_plan(Steady(signal_after=0), reqs(4), driver.Plan("offline"), loop=loop)
    assert driven.stopped == "all requests issued" and all(r.ok for r in driven.records)


def test_requests_cut_before_they_started_are_records_too(loop: asyncio.AbstractEventLoop) -> None:
    flights = driver.Flights()

    async def run() -> list[driver.RequestRecord]:
        # runs after the requests are issued, before any of their tasks first ran
        asyncio.get_running_loop().call_soon(flights.stop, "stopped")
        return await driver.run_offline(Steady(signal_after=0), list(reqs(3)), 60.0, flights)

    records = loop.run_until_complete(run())
    assert [r.id for r in records] == ["r0", "r1", "r2"]
    assert all(r.error == "stopped before this request completed" for r in records)
