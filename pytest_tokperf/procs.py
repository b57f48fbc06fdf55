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
INVALID, named (`verdict.validity`). Progress lines and early stopping need the live
records in one process, so with several processes a run goes to its bound.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
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


@dataclass(frozen=True)
class Spawn:
    """How a child process loads the same engine."""

    backend: str
    settings: Mapping[str, Any]
    devices: int


def auto_count(offered_tokens_per_s: float | None, cpus: int | None = None) -> int:
    """Processes for the offered load at COST_PER_TOKEN_S, each at BUSY_SHARE of a core."""
    if not offered_tokens_per_s:
        return 1
    most = max(1, (cpus or os.cpu_count() or 2) - 1)  # leave a core for the rest
    return max(1, min(most, math.ceil(offered_tokens_per_s * COST_PER_TOKEN_S / BUSY_SHARE)))


def shares(requests: Sequence[Request], plan: Plan, n: int) -> list[tuple[list[Request], Plan]]:
    """Each child's requests and plan (see the module docstring)."""
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
            child = dataclasses.replace(child, concurrency=max(1, c))
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
    try:
        engine = load_engine(spawn.backend, spawn.settings, spawn.devices)
        loop = driver.new_loop()
        if warmup:
            driver.run(engine, warmup, timeout_s=plan.timeout_s, loop=loop, texts=plan.texts)
        conn.send("ready")
        start_ns = conn.recv()
        requests = _cycle(share) if endless else share
        plan = dataclasses.replace(plan, start_ns=start_ns)
        driven = driver.run_plan(engine, requests, plan, loop=loop)
        loop.run_until_complete(engine.aclose())
        loop.close()
        conn.send(driven)
    except Exception as exc:  # the parent turns it into an error naming the process
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


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
) -> Driven:
    """Run `plan` over `requests` in `n` child processes and merge what they recorded."""
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
        results: list[Driven] = []
        for i, (proc, conn, _) in enumerate(children):
            said = conn.recv()
            if not isinstance(said, Driven):
                raise ClientProcsError(f"client process {i + 1} (pid {proc.pid}): {said}")
            results.append(said)
    except EOFError:
        raise ClientProcsError("a client process ended without a result") from None
    finally:
        for proc, conn, _ in children:
            conn.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return merge(results, [proc.pid or 0 for proc, _, _ in children])


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
            i + 1, pid, len(d.records), sum(r.output_tokens for r in d.records), d.client_cpu
        )
        for i, (d, pid) in enumerate(zip(results, pids, strict=True))
    )
    ends = [d.window_end_ns for d in results if d.window_end_ns is not None]
    return Driven(
        tuple(records),
        None,  # saturation is judged per process (ClientProc.cpu), naming it
        results[0].stopped if results else "",
        max(ends) if ends else None,
        counted,
        procs,
    )
