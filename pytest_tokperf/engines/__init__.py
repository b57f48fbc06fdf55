"""The engine protocol every backend implements, and the registry that loads one.

An engine streams the output of one request as chunks; the driver timestamps the
chunks, so an engine never needs to know about clocks, scenarios or metrics.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Request:
    """One prompt to complete: greedy decoding, at most `max_tokens` new tokens.

    `detokenize` False says the caller needs token counts only (a throughput run):
    an engine that can skip turning tokens into text on the hot path does.
    `ignore_eos` asks for exactly `max_tokens` (a trace's output length): the embedded
    engine and the sim honour it; the openai engine sends it only when its settings'
    `extra_body` does (`ignore_eos = true`, for servers that accept it).
    """

    id: str
    prompt: str
    max_tokens: int
    detokenize: bool = True
    ignore_eos: bool = False


@dataclass(frozen=True)
class Chunk:
    """New output that arrived together: `tokens` new tokens (ids/text when known)."""

    tokens: int
    text: str = ""
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class EngineInfo:
    """What ran: the context every number and failure message carries."""

    backend: str
    model: str
    precision: str
    devices: int
    versions: Mapping[str, str] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        unit = "device" if self.devices == 1 else "devices"
        return f"engine {self.backend}, model {self.model} {self.precision}, {self.devices} {unit}"


@runtime_checkable
class Engine(Protocol):
    info: EngineInfo

    def stream(self, request: Request) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Completion:
    """How a stream read by `ReadEngine.stream_reads` ended.

    `tokens`: the authoritative output token count (the server's usage, else a
    tokenizer's), None when nothing better than the per-read counts is known.
    `trailing`: events counted by the per-read counts after the last token (the usage
    event, `[DONE]`, an empty finishing delta), to take off the last reads.
    `counted_by`: which method gave `tokens` (recorded with the result).
    `end_ns`: when the read that ended the stream arrived (`perf_counter_ns`, taken in
    that read, before any parsing or counting); 0: not known, the driver stamps it.
    `count`: a count the engine defers until the run is over (a tokenizer, the
    server's tokenize endpoint), so it never delays the next request; it returns the
    output tokens that `counted_by` names, and raises when it cannot count. Meanwhile
    `tokens` is what is known without it (usage, else None: the events).
    `token_ids`: the output's ids, when the engine knows them (accuracy parity).
    """

    tokens: int | None
    trailing: int = 0
    text: str = ""
    counted_by: str = "chunks"
    end_ns: int = 0
    count: Callable[[], int] | None = None
    token_ids: tuple[int, ...] = ()


@runtime_checkable
class ReadEngine(Protocol):
    """An engine that stamps its own reads: each socket read, or each chunk where the
    engine saw it first (its child process, its worker thread).

    Each read that delivers events appends, from the read itself, its arrival time
    (`perf_counter_ns`) to `times` and its event count to `counts` (the caller may
    look at both while the stream runs); the returned `Completion` settles the counts
    and says when the stream ended. This is the path the driver prefers: no
    async-generator step, no call and no object per token or event, and no hop to the
    event loop between an event and its stamp. `texts=False`: the caller does not need
    the text (a perf run).
    """

    async def stream_reads(
        self, request: Request, times: list[int], counts: list[int], texts: bool
    ) -> Completion: ...


async def sleep_off_loop(seconds: float) -> None:
    """`asyncio.sleep(seconds)` with no timer on the event loop where Linux allows: a
    timerfd (a kernel timer read as a file) wakes the loop as a socket would.

    For the checks that tick while tokens stream (request timeouts, progress, early
    stopping, a run's time limit). While any loop timer is pending, every `epoll_wait`
    that blocks arms a kernel timer of its own, which cost the client about 2% of its
    CPU per streamed token against a server streaming at full speed (perf, on
    benchmarks/client_overhead.py). A thread could wake the loop too, but a process's
    first thread turns on glibc's locking and cancellation wrappers around every read
    from then on, which cost more than the timer (same measure). Where no timerfd can
    be made (not Linux, an infinite or odd `seconds`), it is `asyncio.sleep`.
    """
    loop = asyncio.get_running_loop()
    fd = _timerfd(seconds) if math.isfinite(seconds) else None
    if fd is not None:
        woken: asyncio.Future[None] = loop.create_future()
        try:
            loop.add_reader(fd, _set_done, woken)
        except NotImplementedError:  # a loop that watches no files (Windows' proactor)
            os.close(fd)
        else:
            try:
                await woken
            finally:
                loop.remove_reader(fd)
                os.close(fd)
            return
    await asyncio.sleep(seconds)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _timerfd(seconds: float) -> int | None:
    """A non-blocking Linux timerfd that becomes readable in `seconds` (finite); None
    where there is none."""
    libc = _libc()
    if libc is None:
        return None
    import ctypes

    ns = max(1, round(seconds * 1e9))  # 0 would disarm it
    # struct itimerspec: (interval, value), each (time_t seconds, long nanoseconds)
    spec = (ctypes.c_long * 4)(0, 0, ns // 1_000_000_000, ns % 1_000_000_000)
    fd: int = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        return None
    if libc.timerfd_settime(fd, 0, spec, None) != 0:
        os.close(fd)
        return None
    return fd


@functools.cache
def _libc() -> Any:
    """The C library, where it has timerfds (Linux); os.timerfd_create is Python 3.13+."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.timerfd_create, libc.timerfd_settime  # noqa: B018  # both there, or None
    except (OSError, AttributeError):
        return None
    return libc


def reconcile(counts: Sequence[int], trailing: int, total: int | None) -> list[int]:
    """Per-read counts settled to `total`: never negative, no chunk added or moved.

    The `trailing` non-token events come off the last reads; the rest is spread over
    the reads in proportion to their cumulative count (rounded up, so the first read
    with a token keeps at least one): a server sending several tokens per event gets
    its tokens where they arrived, never in an extra chunk after the stream.
    """
    out = list(counts)
    i = len(out) - 1
    while trailing > 0 and i >= 0:
        take = min(trailing, out[i])
        out[i] -= take
        trailing -= take
        i -= 1
    if total is None:
        return out
    counted = sum(out)
    if counted == total or counted == 0:
        return out
    settled, cum, before = [], 0, 0
    for n in out:
        cum += n
        now = -(-total * cum // counted)  # ceil
        settled.append(now - before)
        before = now
    return settled


@runtime_checkable
class PreparingEngine(Protocol):
    """An engine that can tokenize a workload's prompts before the measured run.

    trtllm-bench sends token ids; tokenizing each prompt once, up front, keeps that
    CPU work out of the measurement.
    """

    def prepare(self, prompts: Sequence[str]) -> None: ...


@runtime_checkable
class LogitsEngine(Protocol):
    """An engine that can also score a given continuation (in-process engines).

    Not part of `Engine`: a served model may expose no logits at all. Accuracy
    parity's distribution metrics (KL divergence, top-1 agreement) need it.
    """

    def logits(self, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Row i: next-token logits (n_vocab) after `prompt` and `continuation[:i]`."""
        ...


class EngineError(Exception):
    """An engine could not be loaded; the message says why and how to fix it."""


class MissingExtraError(EngineError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, backend: str, extra: str, module: str) -> None:
        super().__init__(
            f"the {backend!r} engine needs the Python module {module!r}, which is not "
            f"installed; install it with: pip install 'pytest-tokperf[{extra}]'"
        )


BACKENDS: dict[str, str] = {
    "llamacpp": "pytest_tokperf.engines.llamacpp",
    "openai": "pytest_tokperf.engines.openai",
    "trtllm": "pytest_tokperf.engines.trtllm",
    "sim": "pytest_tokperf.engines.sim",
    "transformers": "pytest_tokperf.engines.transformers",
}


def load_engine(backend: str, settings: Mapping[str, Any], devices: int = 1) -> Engine:
    """Load the engine `backend` with `settings` on `devices` allocated devices."""
    if backend not in BACKENDS:
        raise EngineError(
            f"unknown engine backend {backend!r}; available: {', '.join(sorted(BACKENDS))}"
        )
    module = importlib.import_module(BACKENDS[backend])
    engine: Engine = module.load(settings, devices)
    return engine
