"""The HTTP/1.1 client: keep-alive connections as an `asyncio.Protocol`, pooled per loop.

A small client of its own, because the per-token cost of a general HTTP library is
several times what timing needs (benchmarks/client_overhead.py measures it against a
raw-socket floor). Each socket read is handed to the driver as it happens, with the
number of SSE `data:` events it holds (one `bytes.count`), stamped in that read; a
request ends at the read that ended its body.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import ssl
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_tokperf.engines import sleep_off_loop
from pytest_tokperf.engines.openai.stream import StreamError, _event

# an Offline run sends everything at once: a 24,576-sample run against a 2,048-batch
# server must not queue in the client, so the pool is as large as open files allow
MAX_CONNECTIONS = 65_536
END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body
NS = 1_000_000_000
_clock = time.perf_counter_ns


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    # None: the run's own timeout. An Offline request's first token legitimately waits
    # for the whole queue before it; the clock starts when the request is sent.
    first_token_s: float | None = None
    idle_s: float = 60.0  # between two reads with tokens of one stream
    total_s: float = 1800.0


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time.

    `data_received` is the per-token hot path: keep it to a few C calls, and never copy
    a read (a burst delivers a whole answer in one): the read that holds the end of the
    response head is kept whole, its body starting at `skip`. Each read with events
    appends its arrival time and count to the caller's lists (`times`, `counts`), as
    `self.times.append(...)`: CPython runs a list's `append` inline, where a kept bound
    method costs a generic lookup and a call (perf, 5 burst runs: it was half of this
    client's extra interpreter time against the floor client's).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.failed = False  # ended by `fail`, not by the server closing: not retried
        self.done: asyncio.Future[None] | None = None
        self.times: list[int] = []  # the caller's lists, given by `send`
        self.counts: list[int] = []
        self.streaming = False  # mid-body of a chunked stream, its first token seen
        self.in_body = False
        self.head = b""
        self.status = 0
        self.chunked = False
        self.remaining = -1  # Content-Length still to come; -1: chunked or until close
        self.keep_alive = True
        self.blocks: list[bytes] = []
        self.skip = 0  # where the body starts in blocks[0] (after the response head)
        self.first = True  # no token seen yet: classify events exactly
        self.pending = b""  # the first phase's incomplete line
        self.sent_ns = 0
        self.ended_ns = 0  # when the read that ended the body arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if self.in_body and not self.chunked and self.remaining < 0:
                self.ended_ns = _clock()
                self.done.set_result(None)  # a body delimited by the close: complete
            else:
                self.done.set_exception(StreamError("the server closed the connection mid-stream"))

    def send(self, data: bytes, times: list[int], counts: list[int]) -> asyncio.Future[None]:
        assert self.transport is not None
        self.done = done = asyncio.get_running_loop().create_future()
        self.times = times
        self.counts = counts
        self.streaming = self.in_body = self.failed = False
        self.head = b""
        self.blocks = []
        self.skip = 0
        self.first = True
        self.pending = b""
        self.ended_ns = 0
        self.sent_ns = _clock()
        self.transport.write(data)
        return done

    def fail(self, message: str) -> None:
        """End the request with `message` (a timeout, a malformed response): never retried."""
        self.failed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(StreamError(message))
        if self.transport is not None:
            self.transport.close()
        self.closed = True
        self.streaming = False

    def data_received(self, data: bytes) -> None:
        if self.streaming:
            # mid-stream (a paced server: once per token): count, time, look for the end
            self.blocks.append(data)
            n = data.count(b"data:")
            if n:
                self.times.append(_clock())
                self.counts.append(n)
            if data.endswith(END) or (len(data) < len(END) and self._ended()):
                self._end()
            return
        start = 0
        if not self.in_body:
            data, start = self._head(data)
            if not self.in_body:
                return
            self.skip = start
        self.blocks.append(data)
        n = data.count(b"data:", start)
        if self.first and (n or self.pending):
            try:
                n = self._first_tokens(data, start, n)
            except StreamError as exc:
                self.fail(str(exc))
                return
        if n:
            self.times.append(_clock())
            self.counts.append(n)
        if self.chunked:
            if data.endswith(END) or (len(data) - start < len(END) and self._ended()):
                self._end()
            else:
                self.streaming = self.in_body and not self.first
        elif self.remaining >= 0:
            self.remaining -= len(data) - start
            if self.remaining <= 0:
                self._end()

    def _ended(self) -> bool:
        """Whether the chunked body ends with its last chunk, looking back over the reads
        (after a read too short to tell alone: rare)."""
        tail = b""
        for i in range(len(self.blocks) - 1, -1, -1):
            tail = self.blocks[i][self.skip if i == 0 else 0 :] + tail
            if len(tail) >= len(END):
                return tail.endswith(END)
        return tail == END[2:]  # the whole body is the last chunk: an empty answer

    def _end(self) -> None:
        self.ended_ns = _clock()  # the stream's end, stamped in the read that ended it
        self.streaming = self.in_body = False
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _head(self, data: bytes) -> tuple[bytes, int]:
        """Collect the response head; once it is complete, the read that holds what
        follows it and where that starts (the read itself when the head began in it)."""
        if self.head:
            data = self.head + data
        at = data.find(b"\r\n\r\n")
        if at < 0:
            self.head = data
            return data, 0
        head = self.head = data[:at].lower()
        try:  # b"http/1.1 200 ok"
            self.status = int(head[9:12])
        except ValueError:
            self.fail(f"not an HTTP response: {head[:120]!r}")
            return data, 0
        self.chunked = chunked = b"chunked" in _header(head, b"\r\ntransfer-encoding:")
        length = b"" if chunked else _header(head, b"\r\ncontent-length:")
        self.remaining = int(length) if length else -1
        self.keep_alive = (
            head.startswith(b"http/1.1")
            and (b"\r\nconnection:" not in head or _header(head, b"\r\nconnection:") != b"close")
            and (chunked or self.remaining >= 0)
        )
        if self.status >= 400:  # its body is an error, not tokens: its reads are not kept
            self.first = False
            self.times = []  # still what the idle timeout looks at: times only
            self.counts = []
        self.in_body = True
        if self.remaining == 0:
            self._end()
            self.in_body = False
        return data, at + 4

    def _first_tokens(self, data: bytes, start: int, counted: int) -> int:
        """Events from the first token on in this read (0 before it), parsed exactly;
        `counted`: the events from `start` on.

        A line is counted in the read that holds its `data:`, as the later reads do.
        """
        if self.pending:  # a line split over reads: rare, so a copy is fine
            data, start = self.pending + data[start:], 0
            counted = data.count(b"data:")
        at = start
        while True:
            end = data.find(b"\n", at)
            if end < 0:
                self.pending = data[at:]  # an incomplete line waits for the next read
                return 0
            if data.startswith(b"data:", at) and _event(data[at + 5 : end].strip())[0]:
                self.first = False
                self.pending = b""
                return counted - data.count(b"data:", start, at)  # the few lines before
            at = end + 1

    def body(self) -> bytes:
        """The whole body as received (still chunk-encoded when it is chunked)."""
        if not self.blocks:
            return b""
        return b"".join([self.blocks[0][self.skip :], *self.blocks[1:]])

    def tail(self, size: int) -> tuple[bytes, bool]:
        """The body's last `size` bytes, and whether more of the body comes before them."""
        parts: list[bytes] = []
        need, i, lo = size, len(self.blocks), 0
        while i > 0 and need > 0:
            i -= 1
            block = self.blocks[i]
            base = self.skip if i == 0 else 0
            lo = max(base, len(block) - need)
            parts.append(block[lo:])
            need -= len(block) - lo
        parts.reverse()
        return b"".join(parts), i > 0 or lo > self.skip


def _header(head: bytes, name: bytes) -> bytes:
    """The value of a header in a lowercased response head (b"" when absent); `name` as
    searched for: b"\r\ncontent-length:"."""
    at = head.find(name)
    if at < 0:
        return b""
    end = head.find(b"\r\n", at + 2)
    return head[at + len(name) : end if end >= 0 else None].strip()


def _dechunk(raw: bytes) -> bytes:
    out, at = [], 0
    while True:
        eol = raw.find(b"\r\n", at)
        if eol < 0:
            break
        size = int(raw[at:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(raw[eol + 2 : eol + 2 + size])
        at = eol + 2 + size + 2
    return b"".join(out)


class _Pool:
    """Keep-alive connections of one event loop, at most `limit` at once.

    Its own slot count rather than an `asyncio.Semaphore`: taking a kept-alive
    connection is then a plain call, no coroutine, once per request on the hot path.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        sni: str | None,
        limit: int,
        timeouts: Timeouts,
    ) -> None:
        self.host, self.port, self.tls, self.sni = host, port, tls, sni
        self.timeouts = timeouts
        self.idle: list[_Conn] = []
        self.free = limit  # slots neither in use nor handed to a waiter
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.active: set[_Conn] = set()
        self.watcher: asyncio.Task[None] | None = None

    def take(self) -> _Conn | None:
        """A kept-alive idle connection with its slot, when one is free (no waiting)."""
        if self.free > 0:
            idle = self.idle
            while idle:
                conn = idle.pop()
                if (
                    not conn.closed
                    and conn.transport is not None
                    and not conn.transport.is_closing()
                ):
                    self.free -= 1
                    return conn
        return None

    async def acquire(self) -> tuple[_Conn, bool]:
        """A connection, and whether it was used before (the server may have closed it)."""
        if self.free > 0:
            self.free -= 1
        else:
            await self._wait()  # waiting for a free connection is not timed
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    _Conn, self.host, self.port, ssl=self.tls, server_hostname=self.sni
                ),
                self.timeouts.connect_s,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self._give()
            raise StreamError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from None
        except BaseException:
            self._give()
            raise
        return conn, False

    async def _wait(self) -> None:
        """Until a released slot is handed to this request (first come, first served)."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self.waiting.remove(waiter)
            else:  # handed a slot just as the request was cancelled: pass it on
                self._give()
            raise

    def _give(self) -> None:
        """A slot is free again: to the first waiter, else back to the count."""
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1

    def release(self, conn: _Conn, reusable: bool) -> None:
        self.active.discard(conn)
        if reusable and not conn.closed:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        self._give()

    def watch(self, conn: _Conn) -> None:
        self.active.add(conn)
        if self.watcher is None or self.watcher.done():
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """One watcher for all streams, woken off the loop (`sleep_off_loop`): cheaper
        per token than a timer per read, or any loop timer."""
        t = self.timeouts
        tick = min(1.0, t.idle_s / 4, (t.first_token_s or 4.0) / 4)
        while self.active:
            await sleep_off_loop(tick)
            now = time.perf_counter_ns()
            for conn in list(self.active):
                if now - conn.sent_ns > t.total_s * NS:
                    conn.fail(f"the request took longer than the total timeout of {t.total_s:g} s")
                elif conn.first:
                    if t.first_token_s is not None and now - conn.sent_ns > t.first_token_s * NS:
                        conn.fail(
                            f"no data within the first-token timeout of {t.first_token_s:g} s"
                        )
                elif now - (conn.times[-1] if conn.times else conn.sent_ns) > t.idle_s * NS:
                    conn.fail(f"no data for the idle timeout of {t.idle_s:g} s")

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
        if self.watcher is not None:
            self.watcher.cancel()


def _get_json(url: str, headers: Mapping[str, str], timeout_s: float) -> Any:
    req = urllib.request.Request(url, headers=dict(headers))
    with urllib.request.urlopen(req, timeout=timeout_s) as response:
        return json.loads(response.read())


def _post_json(
    url: str, body: Mapping[str, Any], headers: Mapping[str, str], timeout_s: float
) -> Any:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={**headers, "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as response:
        return json.loads(response.read())


def _connections(setting: object) -> int:
    """The pool's size, within the open-files limit (raised to its hard limit)."""
    want = int(str(setting)) if setting else MAX_CONNECTIONS
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, MAX_CONNECTIONS + 1024)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return max(1, min(want, hard - 256))
    except (ImportError, ValueError, OSError):
        return max(1, want)
