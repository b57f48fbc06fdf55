"""Issue requests to an engine the way a scenario says and record raw timestamps.

The driver knows only the engine protocol. Every request ends as a `RequestRecord`,
also when it fails or times out: an error is data, never an exception that ends the
run. Times are integer nanoseconds from `time.perf_counter_ns`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_tokperf.engines import Engine, Request

SCENARIOS = ("offline",)


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request, in `perf_counter_ns` nanoseconds."""

    id: str
    issue_ns: int
    end_ns: int
    chunk_ns: tuple[int, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    text: str = ""
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # when the engine reports them (accuracy parity)

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def first_chunk_ns(self) -> int | None:
        return self.chunk_ns[0] if self.chunk_ns else None

    @property
    def ok(self) -> bool:
        return self.error is None


async def _issue(engine: Engine, request: Request, issue_ns: int) -> RequestRecord:
    """Stream one request; timestamps are taken as each chunk reaches the client."""
    clock = time.perf_counter_ns
    chunk_ns: list[int] = []
    chunk_tokens: list[int] = []
    texts: list[str] = []
    token_ids: list[int] = []
    error: str | None = None
    try:
        async for chunk in engine.stream(request):
            chunk_ns.append(clock())
            chunk_tokens.append(chunk.tokens)
            texts.append(chunk.text)
            token_ids.extend(chunk.token_ids)
    except asyncio.CancelledError:
        error = "cancelled: the run's time limit was reached before this request completed"
    except Exception as exc:  # any engine failure becomes the record's error
        error = f"{type(exc).__name__}: {exc}"
    return RequestRecord(
        id=request.id,
        issue_ns=issue_ns,
        end_ns=clock(),
        chunk_ns=tuple(chunk_ns),
        chunk_tokens=tuple(chunk_tokens),
        text="".join(texts),
        error=error,
        token_ids=tuple(token_ids),
    )


async def run_offline(
    engine: Engine, requests: Sequence[Request], timeout_s: float
) -> list[RequestRecord]:
    """MLPerf Offline: issue every request at t0 and let the engine schedule them.

    Requests still running after `timeout_s` are cancelled and recorded as failed.
    """
    t0 = time.perf_counter_ns()
    tasks = [asyncio.create_task(_issue(engine, r, t0)) for r in requests]
    await asyncio.wait(tasks, timeout=timeout_s)
    for task in tasks:
        task.cancel()  # a no-op for finished tasks; `_issue` turns it into a record
    return list(await asyncio.gather(*tasks))


def run(
    engine: Engine,
    requests: Sequence[Request],
    *,
    scenario: str = "offline",
    warmup: Sequence[Request] = (),
    timeout_s: float = 600.0,
    loop: asyncio.AbstractEventLoop | None = None,
) -> list[RequestRecord]:
    """Run warm-up requests (discarded), then the measured scenario.

    `loop` is the process's long-lived event loop, so engines can keep connection
    pools across runs; without one, a fresh loop runs just this call.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; available: {', '.join(SCENARIOS)}")

    async def main() -> list[RequestRecord]:
        if warmup:
            await run_offline(engine, warmup, timeout_s)
        return await run_offline(engine, requests, timeout_s)

    if loop is None:
        return asyncio.run(main())
    return loop.run_until_complete(main())


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: it reads sockets into a reused buffer, which is most of the
    client cost per streamed token (shared FACTS.md); else the standard loop."""
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
