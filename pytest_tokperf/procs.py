"""A run's issuing and streaming split over several client processes.

One Python process streams a few hundred thousand tokens per second at best (its
event loop runs on one core); a rack streams more. With `--tokperf-client-procs N`
each of N child processes loads the same engine (its own event loop and connection
pool), takes its share of the schedule and returns its records, which the parent
merges: timestamps are `perf_counter_ns`, one monotonic clock for every process on a
machine. How the schedule is split:

- offline: requests dealt round-robin, all started at one common instant;
- server / interactive: ONE seeded Poisson schedule, its (request, arrival) pairs
  dealt round-robin, each child issuing at the common start + the arrival offset;
- concurrency: the concurrency split as evenly as it goes, requests dealt round-robin.

Each child measures its own driver CPU share; one saturated child makes the run
INVALID, named (`verdict.validity`). Progress lines and early stopping work as with one
process: every look the parent asks all children at once for what changed (records
finished since the last look, requests in flight cut at the present), so its snapshot
is the one process's, exact within the time a message takes; a decisive verdict
tells every child to stop issuing (requests in flight finish), the window ending at
the parent's decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from pytest_tokperf import driver
from pytest_tokperf.driver import ClientProc, Driven, Plan, RequestRecord
from pytest_tokperf.engines import Request, load_engine

START_MARGIN_S = 0.2  # after every child is ready: time to read the start instant
# client CPU per streamed token that `auto` plans with: the openai engine's paced cost
# measured by benchmarks/client_overhead.py (about 12 us here), rounded up
COST_PER_TOKEN_S = 15e-6
BUSY_SHARE = 0.5  # plan each process to half a core, far from saturation
SPAWNABLE = ("openai", "sim")  # engines a child can load again from their settings
LOOK, STOP = "look", "stop"  # the parent's messages to a running child
Progress = Callable[[Sequence[RequestRecord], float], None]


@dataclass(frozen=True)
class Spawn:
    """How a child process loads the same engine."""

    backend: str
    settings: Mapping[str, Any]
    devices: int


def usable_cores() -> int:
    """The cores this process may run on: its affinity (taskset, cgroups' cpusets), not
    the machine's count, so clients pinned beside a server plan for their own cores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 2  # pragma: no cover - not Linux


def auto_count(offered_tokens_per_s: float | None, cpus: int | None = None) -> int:
    """Processes for the offered load at COST_PER_TOKEN_S, each at BUSY_SHARE of a core."""
    if not offered_tokens_per_s:
        return 1
    most = max(1, (cpus or usable_cores()) - 1)  # leave a core for the rest
    return max(1, min(most, math.ceil(offered_tokens_per_s * COST_PER_TOKEN_S / BUSY_SHARE)))


def shares(requests: Sequence[Request], plan: Plan, n: int) -> list[tuple[list[Request], Plan]]:
    """Each child's requests and plan (see the module docstring)."""
    if plan.concurrency is not None and plan.concurrency < n:
        raise ValueError(
            f"{n} client processes cannot keep concurrency {plan.concurrency}: each keeps at "
            "least one stream; use at most that many processes"
        )
    out = []
    offsets: list[int] = []
    if plan.scenario in ("server", "interactive"):
        assert plan.qps is not None
        offsets = list(
            itertools.islice(driver.poisson_offsets_ns(plan.qps, plan.seed), len(requests))
        )
    for i in range(n):
        mine = list(requests[i::n])
        child = dataclasses.replace(plan, look_every_s=plan.look_every_s)
        if offsets:
            child = dataclasses.replace(child, offsets_ns=tuple(offsets[i::n]))
        if plan.concurrency is not None:
            c = plan.concurrency // n + (1 if i < plan.concurrency % n else 0)
            child = dataclasses.replace(child, concurrency=c)
        out.append((mine, child))
    return out


def _cycle(share: Sequence[Request]) -> Iterator[Request]:
    """An endless share for a run bounded by time: ids stay unique per round."""
    for k in itertools.count():
        for r in share:
            yield r if k == 0 else dataclasses.replace(r, id=f"{r.id}~{k}")


def _child(
    spawn: Spawn,
    share: list[Request],
    plan: Plan,
    endless: bool,
    warmup: list[Request],
    conn: Connection,
) -> None:
    said: object
    try:
        engine = load_engine(spawn.backend, spawn.settings, spawn.devices)
        loop = driver.new_loop()
        if warmup:
            driver.run(engine, warmup, timeout_s=plan.timeout_s, loop=loop, texts=plan.texts)
        conn.send("ready")
        start_ns = conn.recv()
        requests = _cycle(share) if endless else share
        plan = dataclasses.replace(plan, start_ns=start_ns)
        flights = driver.Flights()  # the parent's looks read it, its stop ends issuing
        loop.add_reader(conn.fileno(), _answer, conn, flights)
        # uvloop's reader (libuv's poll) made the pipe non-blocking: a send larger than
        # the pipe (a look's or the result's records, hundreds of KB) then broke off
        # half written at the first EAGAIN, and the parent read a truncated message
        os.set_blocking(conn.fileno(), True)
        try:
            said = driver.run_plan(engine, requests, plan, loop=loop, flights=flights)
        except driver.Interrupted as exc:  # Ctrl-C, or the parent went away: what finished
            said = exc.driven
        finally:
            loop.remove_reader(conn.fileno())
        loop.run_until_complete(engine.aclose())
        loop.close()
    except Exception as exc:  # the parent turns it into an error naming the process
        said = f"{type(exc).__name__}: {exc}"
    try:
        conn.send(said)
    except OSError:
        pass  # the parent has gone: nobody is left to tell
    finally:
        conn.close()


def _answer(conn: Connection, flights: driver.Flights) -> None:
    """A message from the parent, read on the child's event loop while its run goes on."""
    try:
        said = conn.recv()
    except (EOFError, OSError):  # the parent went away: end the run, keep nothing waiting
        asyncio.get_running_loop().remove_reader(conn.fileno())
        flights.stop("the parent process went away")
        return
    if said == LOOK:
        new, flying = flights.look(time.perf_counter_ns())
        conn.send((LOOK, new, flying))
    elif isinstance(said, tuple) and said[0] == STOP:
        flights.end_issuing(said[1], said[2])


class ClientProcsError(Exception):
    """A client process failed to start or run; the message names it."""


def run(
    spawn: Spawn,
    requests: Sequence[Request],
    plan: Plan,
    n: int,
    *,
    endless: bool = False,
    warmup: Sequence[Request] = (),
    stop: driver.Snapshot | None = None,
    progress: Progress | None = None,
) -> Driven:
    """Run `plan` over `requests` in `n` child processes and merge what they recorded.

    `stop` and `progress` are called as `driver.drive` calls them, on snapshots merged
    from every child (see the module docstring).
    """
    if spawn.backend not in SPAWNABLE:
        raise ClientProcsError(
            f"several client processes need an engine a child can load again "
            f"({', '.join(SPAWNABLE)}), not {spawn.backend!r}: use --tokperf-client-procs 1"
        )
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    children = []
    for i, (share, child_plan) in enumerate(shares(requests, plan, n)):
        parent, child = context.Pipe()
        warm = list(warmup[i::n])
        proc = context.Process(
            target=_child,
            args=(spawn, share, child_plan, endless, warm, child),
            name=f"tokperf-client-{i + 1}",
            daemon=True,
        )
        proc.start()
        child.close()
        children.append((proc, parent, len(share)))
    try:
        for i, (proc, conn, _) in enumerate(children):
            said = conn.recv()
            if said != "ready":
                raise ClientProcsError(f"client process {i + 1} (pid {proc.pid}): {said}")
        start_ns = time.perf_counter_ns() + round(START_MARGIN_S * driver.NS)
        for _, conn, _ in children:
            conn.send(start_ns)
        watch = _Watch(children, plan, start_ns, stop, progress)
        results = watch.results()
    except EOFError:
        raise ClientProcsError("a client process ended without a result") from None
    finally:
        for proc, conn, _ in children:
            conn.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    driven = merge(results, [proc.pid or 0 for proc, _, _ in children])
    if watch.decided is not None:
        driven = dataclasses.replace(driven, stopped=watch.decided)
    return driven


class _Watch:
    """The parent's side of a run in children: their results, and on the way the looks
    that feed `progress` and `stop` with merged snapshots."""

    def __init__(
        self,
        children: Sequence[tuple[multiprocessing.process.BaseProcess, Connection, int]],
        plan: Plan,
        start_ns: int,
        stop: driver.Snapshot | None,
        progress: Progress | None,
    ) -> None:
        self.procs = [proc for proc, _, _ in children]
        self.conns = [conn for _, conn, _ in children]
        self.plan = plan
        self.start_ns = start_ns
        self.stop = stop
        self.progress = progress
        self.got: dict[int, Driven] = {}  # the children's results, as they come
        # per child still running: records finished (looks so far), in flight (last look)
        self.finished: list[list[RequestRecord]] = [[] for _ in children]
        self.flying: list[list[RequestRecord]] = [[] for _ in children]
        self.decided: str | None = None  # the early stop's reason, once decided
        # offline has no looks, as with one process
        self.looking = plan.scenario != "offline" and (stop is not None or progress is not None)

    def results(self) -> list[Driven]:
        """Every child's Driven, in child order (looking meanwhile)."""
        look_ns = max(1, round(self.plan.look_every_s * driver.NS))
        next_look = self.start_ns + look_ns
        while len(self.got) < len(self.conns):
            timeout = None
            if self.looking and self.decided is None:
                timeout = max(0.0, (next_look - time.perf_counter_ns()) / driver.NS)
            for i in self._ready(self._running(), timeout):
                self._take(i)
            if self.looking and self.decided is None and time.perf_counter_ns() >= next_look:
                self._look()
                next_look = max(next_look + look_ns, time.perf_counter_ns())
        return [self.got[i] for i in range(len(self.conns))]

    def _running(self) -> list[int]:
        return [i for i in range(len(self.conns)) if i not in self.got]

    def _ready(self, children: Sequence[int], timeout: float | None) -> list[int]:
        by_conn = {id(self.conns[i]): i for i in children}
        return [by_conn[id(c)] for c in wait([self.conns[i] for i in children], timeout)]

    def _take(self, i: int) -> None:
        """Child i's next message: its result, or its answer to a look."""
        said = self.conns[i].recv()
        if isinstance(said, Driven):
            self.got[i] = said
            self.finished[i], self.flying[i] = [], []
        elif isinstance(said, tuple) and said[0] == LOOK:
            self.finished[i].extend(said[1])
            self.flying[i] = said[2]
        else:
            raise ClientProcsError(f"client process {i + 1} (pid {self.procs[i].pid}): {said}")

    def _send(self, i: int, message: object) -> bool:
        """False when child i has already gone (its result still waits in the pipe)."""
        try:
            self.conns[i].send(message)
        except OSError:
            return False
        return True

    def _look(self) -> None:
        """Ask every running child at once, take all answers, judge the merged snapshot.

        A child that finished meanwhile answers with its result instead."""
        asked = [i for i in self._running() if self._send(i, LOOK)]
        while asked:
            for i in self._ready(asked, None):
                self._take(i)
                asked.remove(i)
        now = time.perf_counter_ns()
        elapsed = (now - self.start_ns) / driver.NS
        bound = self.plan.max_duration_s
        if bound is not None and elapsed >= bound:
            self.looking = False  # the children stop issuing themselves, as one process does
            return
        snapshot: list[RequestRecord] = []
        finished = 0
        for i in range(len(self.conns)):
            if i in self.got:
                snapshot.extend(self.got[i].records)
                finished += len(self.got[i].records)
            else:
                snapshot.extend(self.finished[i])
                snapshot.extend(self.flying[i])
                finished += len(self.finished[i])
        snapshot.sort(key=lambda r: r.issue_ns)  # issue order, as one process's
        if self.progress is not None:
            self.progress(snapshot, elapsed)
        ready = finished >= self.plan.min_requests and elapsed >= self.plan.min_duration_s
        if self.stop is not None and ready and self.stop(snapshot, elapsed):
            self.decided = f"early stop after {elapsed:.1f} s: the verdict was decisive"
            for i in self._running():
                self._send(i, (STOP, self.decided, now))


def merge(results: Sequence[Driven], pids: Sequence[int]) -> Driven:
    """One run's Driven from its processes' (records in issue order)."""
    records: list[RequestRecord] = sorted(
        (r for d in results for r in d.records), key=lambda r: r.issue_ns
    )
    counted: dict[str, int] = {}
    for d in results:
        for method, k in d.token_counting.items():
            counted[method] = counted.get(method, 0) + k
    procs = tuple(
        ClientProc(
            i + 1,
            pid,
            len(d.records),
            sum(r.output_tokens for r in d.records),
            d.client_cpu,
            d.client_cpu_s,
        )
        for i, (d, pid) in enumerate(zip(results, pids, strict=True))
    )
    ends = [d.window_end_ns for d in results if d.window_end_ns is not None]
    used = [d.client_cpu_s for d in results]
    return Driven(
        tuple(records),
        None,  # saturation is judged per process (ClientProc.cpu), naming it
        results[0].stopped if results else "",
        max(ends) if ends else None,
        counted,
        procs,
        sum(u for u in used if u is not None) if None not in used else None,
    )
