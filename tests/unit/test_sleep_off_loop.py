"""`sleep_off_loop`: a sleep that leaves no timer on the event loop (Linux: a timerfd).

A pending loop timer makes every blocking `epoll_wait` arm a kernel timer, a cost per
streamed token; the run's periodic checks sleep this way instead. These tests check
what it promises: it sleeps as long as asked, no loop timer is pending meanwhile, and
its file descriptor is gone afterwards, also when it is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from pytest_tokperf.driver import new_loop
from pytest_tokperf.engines import sleep_off_loop

LINUX = sys.platform.startswith("linux")
LOOPS = {"asyncio": asyncio.new_event_loop, "driver-loop": new_loop}  # uvloop when installed
linux_only = pytest.mark.skipif(not LINUX, reason="a timerfd is Linux's; elsewhere asyncio.sleep")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("make", LOOPS.values(), ids=list(LOOPS))
@pytest.mark.parametrize("seconds", [0.0, 0.05, 0.3])
def test_it_sleeps_as_long_as_asked(make, seconds) -> None:
    loop = make()
    try:
        start = time.perf_counter()
        loop.run_until_complete(sleep_off_loop(seconds))
        took = time.perf_counter() - start
    finally:
        loop.close()
    assert seconds <= took < seconds + 1.0  # generous: a loaded 2-core machine


@linux_only
def test_no_loop_timer_is_pending_while_it_sleeps_and_its_fd_is_closed_after() -> None:
    loop = asyncio.new_event_loop()  # the standard loop: its timers are in `_scheduled`
    seen: dict[str, object] = {}

    async def main() -> None:
        before = seen["before"] = _fds()
        sleeper = asyncio.create_task(sleep_off_loop(0.2))
        await asyncio.sleep(0)  # the sleeper is now waiting
        seen["timers"] = list(loop._scheduled)  # type: ignore[attr-defined]
        seen["fds"] = _fds() - before
        await sleeper
        seen["after"] = _fds() - before

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert seen["timers"] == []
    assert len(seen["fds"]) == 1  # type: ignore[arg-type]  # the timerfd, while it sleeps
    assert seen["after"] == set()


@linux_only
@pytest.mark.parametrize("make", LOOPS.values(), ids=list(LOOPS))
@pytest.mark.parametrize("seconds", [3600, float("inf")])
def test_a_cancelled_sleep_ends_at_once_and_leaves_no_fd(make, seconds) -> None:
    loop = make()

    async def main() -> tuple[float, set[str]]:
        before = _fds()
        sleeper = asyncio.create_task(sleep_off_loop(seconds))
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        return time.perf_counter() - start, _fds() - before

    try:
        took, left = loop.run_until_complete(main())
    finally:
        loop.close()
    assert took < 1.0
    assert left == set()
