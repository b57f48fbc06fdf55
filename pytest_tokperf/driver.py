"""Issue requests to an engine the way a scenario says and record raw timestamps.

The driver knows only the engine protocol. Every request ends as a `RequestRecord`,
also when it fails or times out: an error is data, never an exception that ends the
run. Times are integer nanoseconds from `time.perf_counter_ns`.

Scenarios (MLPerf Inference names): `offline` issues everything at once; `server`
issues at seeded Poisson arrival times (`interactive` is the same load, judged by
tighter SLOs); `concurrency` keeps N requests in flight (closed loop); `trace`
issues each request at its trace time (`Plan.offsets_ns`, see trace.py). While a
server or concurrency run goes on, a watcher looks at a snapshot of the records
(in-flight requests included, up to now) to report progress and to stop early.
A run's requests in flight and done are its `Flights` (flights.py); the record each
ends as is `records.RequestRecord`, which this module passes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_tokperf.engines import (
    Completion,
    Engine,
    ReadEngine,
    Request,
    sleep_off_loop,
)
from pytest_tokperf.flights import Flights as Flights
from pytest_tokperf.flights import Live
from pytest_tokperf.records import RequestRecord as RequestRecord

NS = 1_000_000_000
_clock = time.perf_counter_ns
SCENARIOS = ("offline", "server", "interactive", "concurrency", "trace")
TIMED = ("server", "interactive", "trace")  # issued at scheduled times
LOOK_EVERY_S = 0.25  # how often the watcher wakes for progress and stop checks
INTERRUPTED = "interrupted (SIGINT)"


UNCOUNTED = "SSE events (the count after the run was interrupted)"


async def _stream(
    engine: Engine, live: Live, flights: Flights, texts: bool = True
) -> RequestRecord:
    """Stream one request; timestamps are taken as each chunk (or read) reaches the client.

    The end is the read that ended the stream (a ReadEngine stamps it in that read),
    else the moment the engine's stream stopped; what follows it (settling the counts,
    the record) is after the stamp, and a count the engine deferred waits for the end
    of the run (`_count_later`), so neither delays the next request of a closed loop.
    """
    clock = _clock
    error: str | None = None
    end = 0
    try:
        if hasattr(engine, "stream_reads"):  # a ReadEngine (isinstance costs ~50 us)
            reads: ReadEngine = engine  # type: ignore[assignment]
            done = await reads.stream_reads(live.request, live.chunk_ns, live.chunk_tokens, texts)
            end = done.end_ns
            live.settle(done)
            live.token_ids.extend(done.token_ids)
            if done.count is not None:
                live.later = (done.count, done.counted_by)
                if done.tokens is None:
                    live.counted_by = UNCOUNTED  # until the count is taken
        else:
            async for chunk in engine.stream(live.request):
                at = clock()
                if chunk.tokens:  # a chunk of text alone is no token's arrival
                    live.chunk_ns.append(at)
                    live.chunk_tokens.append(chunk.tokens)
                live.texts.append(chunk.text)
                live.token_ids.extend(chunk.token_ids)
            end = clock()
    except asyncio.CancelledError:
        error = flights.cut()
    except Exception as exc:  # any engine failure becomes the record's error
        error = f"{type(exc).__name__}: {exc}"
    record = live.final = live.record(end if error is None and end else clock(), error)
    flights.finished.append(record)
    return record


async def _count_later(lives: Sequence[Live], flights: Flights) -> None:
    """The counts engines deferred (`Completion.count`), taken now that the run is over,
    each request's counts settled again to its own. One at a time on this thread: no
    thread of the client's is started for them. A count that fails fails its request;
    Ctrl-C stops counting (the rest keep their events' counts, said in `counted_by`)."""
    for lv in lives:
        later, lv.later = lv.later, None
        final = lv.final
        if later is None or final is None or not final.ok or flights.stopped is not None:
            continue
        count, by = later
        try:
            total = count()
        except Exception as exc:
            lv.counted_by = ""  # a failed request counts for no method
            lv.final = lv.record(final.end_ns, f"{type(exc).__name__}: {exc}")
        else:
            lv.settle(Completion(total, 0, final.text, by, final.end_ns))
            lv.final = lv.record(final.end_ns)
        await asyncio.sleep(0)  # Ctrl-C (and a parent's looks) are heard meanwhile


async def run_offline(
    engine: Engine,
    requests: Sequence[Request],
    timeout_s: float,
    flights: Flights | None = None,
    texts: bool = True,
) -> list[RequestRecord]:
    """MLPerf Offline: issue every request at t0 and let the engine schedule them.

    Requests still running after `timeout_s` are cancelled and recorded as failed.
    Deferred counts are not taken here (`drive` takes them): a warm-up needs none.
    """
    flights = flights or Flights()
    t0 = _clock()
    lives = [Live(r, t0, None) for r in requests]
    flights.lives.extend(lives)
    tasks = [asyncio.create_task(_stream(engine, live, flights, texts)) for live in lives]
    flights.flying.extend(tasks)
    if tasks:
        cutter = asyncio.create_task(_cut_at(timeout_s, tasks))
        try:
            await asyncio.wait(tasks)
        finally:  # none left to cut a later run on a reused loop, also after an error
            cutter.cancel()
        await asyncio.wait([cutter])
    return await _records(lives, tasks, flights)


async def _cut_at(
    seconds: float, tasks: list[asyncio.Task[Any]], halt: asyncio.Event | None = None
) -> None:
    """The run's time limit: in `seconds`, issue no more (`halt`) and cancel `tasks`
    (each request in flight becomes a record failed with `TIMED_OUT`). Woken off the
    loop (`sleep_off_loop`): no loop timer is pending while tokens stream."""
    await sleep_off_loop(seconds)
    if halt is not None:
        halt.set()
    for task in tasks:
        task.cancel()  # a no-op for finished tasks; `_stream` turns it into a record


async def _records(
    lives: Sequence[Live], tasks: Sequence[asyncio.Task[Any]], flights: Flights
) -> list[RequestRecord]:
    """Every request's record, in issue order, once all are done. A request cancelled
    before its task first ran (Ctrl-C just after it was issued) is a record too."""
    if tasks:
        await asyncio.wait(tasks)
    end = time.perf_counter_ns()
    return [lv.final if lv.final is not None else lv.record(end, flights.cut()) for lv in lives]


async def _counted(
    lives: Sequence[Live], records: list[RequestRecord], flights: Flights
) -> tuple[list[RequestRecord], dict[str, int]]:
    """The run's records once the deferred counts are taken, and how many requests each
    token-counting method counted."""
    await _count_later(lives, flights)
    records = [lv.final or r for lv, r in zip(lives, records, strict=True)]
    counted: dict[str, int] = {}
    for lv in lives:
        if lv.counted_by:
            counted[lv.counted_by] = counted.get(lv.counted_by, 0) + 1
    return records, counted


def poisson_offsets_ns(qps: float, seed: int) -> Iterator[int]:
    """Arrival times after the start, exponential gaps at `qps`; a seed fixes the schedule."""
    rng = random.Random(seed)
    at = 0.0
    while True:
        yield round(at * NS)
        at += rng.expovariate(qps)


@dataclass(frozen=True)
class Plan:
    """How to issue: the scenario, its load and the bounds of the run."""

    scenario: str
    qps: float | None = None
    concurrency: int | None = None
    seed: int = 0
    min_requests: int = 0  # completed requests before the run may stop early
    min_duration_s: float = 0.0  # seconds before the run may stop early
    max_duration_s: float | None = None  # stop issuing after this long
    timeout_s: float = 600.0  # cancel whatever still runs after this long
    look_every_s: float = LOOK_EVERY_S  # how often progress and early stopping look
    texts: bool = True  # keep each answer's text (accuracy needs it, a perf run does not)
    # several client processes (procs.py): each one's share of the one seeded schedule,
    # and the common instant (perf_counter_ns) they all start from
    offsets_ns: tuple[int, ...] | None = None
    start_ns: int | None = None


@dataclass(frozen=True)
class ClientProc:
    """One client process of a run split over several (`--tokperf-client-procs`)."""

    index: int  # 1-based, as the INVALID reason names it
    pid: int
    requests: int
    output_tokens: int
    cpu: float | None  # its driver thread's CPU time / wall time
    cpu_s: float | None = None  # its driver thread's CPU time, seconds (per token: / tokens)


@dataclass(frozen=True)
class Driven:
    """A finished run: its records, the driver thread's CPU share and why it stopped.

    `window_end_ns` is when a run bounded by time stopped issuing: its rate is taken
    over the window the load was applied, not over the drain after it.
    """

    records: tuple[RequestRecord, ...]
    client_cpu: float | None
    stopped: str
    window_end_ns: int | None = None
    token_counting: Mapping[str, int] = field(default_factory=dict)  # requests per method
    procs: tuple[ClientProc, ...] = ()  # several client processes: each one's share
    client_cpu_s: float | None = None  # the driver thread's CPU time over the run, seconds


Snapshot = Callable[[Sequence[RequestRecord], float], bool]


async def drive(
    engine: Engine,
    requests: Iterable[Request],
    plan: Plan,
    *,
    stop: Snapshot | None = None,
    progress: Callable[[Sequence[RequestRecord], float], None] | None = None,
    flights: Flights | None = None,
) -> Driven:
    """Issue `requests` (possibly endless, then bounded by `max_duration_s`) as `plan` says.

    `stop(snapshot, elapsed_s)` is asked on every look once `min_requests` and
    `min_duration_s` are met; True ends issuing (requests in flight finish). A snapshot
    holds every record so far, in-flight requests cut at the present. `flights.stop`
    ends the run from outside; `flights.end_issuing` ends issuing from outside.
    """
    clock = time.perf_counter_ns
    flights = flights or Flights()
    flights.begin()
    if plan.start_ns is not None:
        await asyncio.sleep(max(0.0, (plan.start_ns - clock()) / NS))
    if plan.scenario == "offline":
        cpu0, t0 = time.thread_time_ns(), clock()
        records = await run_offline(engine, list(requests), plan.timeout_s, flights, plan.texts)
        wall = clock() - t0
        used = (time.thread_time_ns() - cpu0) / NS
        cpu = used * NS / wall if wall > 0 else None
        records, counted = await _counted(flights.lives, records, flights)
        stopped = flights.stopped or "all requests issued"
        return Driven(tuple(records), cpu, stopped, token_counting=counted, client_cpu_s=used)
    if plan.scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {plan.scenario!r}; available: {', '.join(SCENARIOS)}")

    t0 = clock() if plan.start_ns is None else plan.start_ns
    cpu0 = time.thread_time_ns()
    deadline = t0 + round(plan.timeout_s * NS)
    end_issuing = deadline if plan.max_duration_s is None else t0 + round(plan.max_duration_s * NS)
    lives = flights.lives
    halt = flights.halt
    texts = plan.texts
    source = iter(requests)

    def out_of_time() -> None:
        flights.end_issuing(f"max_duration_s={plan.max_duration_s} reached", end_issuing)

    async def watch() -> None:
        while not halt.is_set():
            await sleep_off_loop(plan.look_every_s)
            now = clock()
            if now >= end_issuing:
                out_of_time()
                return
            if progress is None and stop is None:
                continue
            elapsed = (now - t0) / NS
            snap = flights.snapshot(now)
            if progress is not None:
                progress(snap, elapsed)
            ready = len(flights.finished) >= plan.min_requests and elapsed >= plan.min_duration_s
            if stop is not None and ready and stop(snap, elapsed):
                # the window the decision saw
                flights.end_issuing(
                    f"early stop after {elapsed:.1f} s: the verdict was decisive", now
                )

    async def wait_halt(seconds: float) -> None:
        """Sleep `seconds`, or less when the run is told to stop."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(halt.wait(), timeout=max(0.0, seconds))

    async def closed_loop() -> None:
        """One of the `concurrency` workers: a request, its stream, the next one. N
        long-lived workers cost less per request than a task per request."""
        while not halt.is_set():
            request = next(source, None)
            if request is None:
                return
            now = clock()
            if now >= end_issuing:
                out_of_time()
                return
            live = Live(request, now, None)
            lives.append(live)
            await _stream(engine, live, flights, texts)

    watcher = asyncio.create_task(watch())
    cutter = asyncio.create_task(_cut_at((deadline - clock()) / NS, flights.flying, halt))
    try:
        if plan.scenario in TIMED:  # a trace brings its own times (`offsets_ns`)
            if plan.offsets_ns is not None:
                schedule: Iterable[int] = plan.offsets_ns
            else:
                assert plan.qps is not None
                schedule = poisson_offsets_ns(plan.qps, plan.seed)
            for request, offset in zip(source, schedule, strict=False):
                scheduled = t0 + offset
                if scheduled >= end_issuing:
                    out_of_time()
                    break
                await wait_halt((scheduled - clock()) / NS)
                if halt.is_set():
                    break
                live = Live(request, clock(), scheduled)
                lives.append(live)
                flights.flying.append(asyncio.create_task(_stream(engine, live, flights, texts)))
        else:  # concurrency: a closed loop
            assert plan.concurrency is not None
            workers = [asyncio.create_task(closed_loop()) for _ in range(plan.concurrency)]
            flights.flying.extend(workers)
            await asyncio.wait(workers)  # until they run out of requests, or `cutter` ends them
        halt.set()
        watcher.cancel()
        tasks = flights.flying
        if tasks:
            await asyncio.wait(tasks)  # the requests in flight finish, or `cutter` ends them
    finally:  # none left to cut a later run on a reused loop, also after an error
        watcher.cancel()
        cutter.cancel()
    await asyncio.wait([watcher, cutter])
    records = await _records(lives, tasks, flights)
    wall = clock() - t0
    used = (time.thread_time_ns() - cpu0) / NS
    cpu = used * NS / wall if wall > 0 else None
    records, counted = await _counted(lives, records, flights)
    reason, at = flights.ended or ("all requests issued", None)
    window_end = at if plan.max_duration_s is not None else None
    stopped = flights.stopped or reason
    return Driven(tuple(records), cpu, stopped, window_end, counted, client_cpu_s=used)


def run(
    engine: Engine,
    requests: Sequence[Request],
    *,
    scenario: str = "offline",
    warmup: Sequence[Request] = (),
    timeout_s: float = 600.0,
    loop: asyncio.AbstractEventLoop | None = None,
    texts: bool = True,
) -> list[RequestRecord]:
    """Run warm-up requests (discarded), then the measured Offline scenario.

    `loop` is the process's long-lived event loop, so engines can keep connection
    pools across runs; without one, a fresh loop runs just this call.
    """
    if scenario != "offline":
        raise ValueError(
            f"unknown scenario {scenario!r} for driver.run; available: offline "
            f"(use driver.run_plan for {', '.join(SCENARIOS[1:])})"
        )
    plan = Plan("offline", timeout_s=timeout_s, texts=texts)
    return list(run_plan(engine, requests, plan, warmup=warmup, loop=loop).records)


def run_plan(
    engine: Engine,
    requests: Iterable[Request],
    plan: Plan,
    *,
    warmup: Sequence[Request] = (),
    stop: Snapshot | None = None,
    progress: Callable[[Sequence[RequestRecord], float], None] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    flights: Flights | None = None,
) -> Driven:
    """Run warm-up requests (discarded, all at once), then the measured scenario.

    `loop` is the process's long-lived event loop (see `run`); without one, a fresh
    loop runs just this call. `flights`: the run's requests, for whoever watches or
    ends it from outside (a client process answering its parent's looks).
    """
    if plan.scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {plan.scenario!r}; available: {', '.join(SCENARIOS)}")
    flights = flights or Flights()

    async def main() -> Driven:
        with _on_sigint(flights):
            if warmup:
                await run_offline(engine, warmup, plan.timeout_s, flights, plan.texts)
            if flights.stopped is not None:
                return Driven((), None, f"{flights.stopped} during the warm-up")
            return await drive(engine, requests, plan, stop=stop, progress=progress,
                               flights=flights)  # fmt: skip

    driven = asyncio.run(main()) if loop is None else loop.run_until_complete(main())
    if flights.stopped is not None:
        raise Interrupted(driven)
    return driven


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run: `driven` holds its records, the requests in flight cut.

    A KeyboardInterrupt, so whoever does not catch it stops as Ctrl-C stops them.
    """

    def __init__(self, driven: Driven) -> None:
        super().__init__(driven.stopped)
        self.driven = driven


@contextlib.contextmanager
def _on_sigint(flights: Flights) -> Iterator[None]:
    """While the run goes on, Ctrl-C stops it in order (see `Flights.stop`); a second
    Ctrl-C interrupts at once. Only where Python's own SIGINT handler is in place (the
    main thread, nobody else's handler), and only on loops that support it."""
    loop = asyncio.get_running_loop()
    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if ours:
        try:
            loop.add_signal_handler(signal.SIGINT, _first_sigint, loop, flights)
        except (NotImplementedError, RuntimeError):  # e.g. Windows' proactor loop
            ours = False
    try:
        yield
    finally:
        if ours:
            loop.remove_signal_handler(signal.SIGINT)  # back to default_int_handler


def _first_sigint(loop: asyncio.AbstractEventLoop, flights: Flights) -> None:
    loop.remove_signal_handler(signal.SIGINT)
    flights.stop(INTERRUPTED)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: it reads sockets into a reused buffer, which is most of the
    client cost per streamed token (benchmarks/client_overhead.py); else the standard loop."""
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
