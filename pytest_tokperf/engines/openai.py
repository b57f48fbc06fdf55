"""Any OpenAI-compatible server (trtllm-serve, vLLM, SGLang, llama.cpp), streamed over HTTP.

The client is a small HTTP/1.1 `asyncio.Protocol` with a keep-alive pool per event
loop, because the per-token cost of a general HTTP library is several times what
timing needs (benchmarks/client_overhead.py measures it against a raw-socket floor).
Each socket read is handed to the driver as it happens, with the number of SSE `data:`
events it holds (one `bytes.count`): no JSON is parsed per event. JSON is parsed for
the events before the first token (a role-only delta is not a token), for the last
events (usage, errors, `[DONE]`), and for all events only when the text is wanted.

A request ends at the read that ended its body, stamped in that read; whatever
follows (parsing, counting) comes after the stamp.

Output tokens come from the server's `usage` (asked for with
`stream_options.include_usage`). Without it they are counted from the text, in this
order: a tokenizer the user names (a GGUF file, or a Hugging Face tokenizer.json); the
served model's own, where this machine has it (`find_tokenizer`); the server's own
tokenize endpoint (vLLM/SGLang `/tokenize`, llama.cpp `/tokenize`, llama-cpp-python
`/extras/tokenize/count`, found when the engine loads). Such a count is taken after
the run (`Completion.count`): a round trip to a busy server, queued behind the other
requests' generation, must not delay the next request. The per-read counts are then
settled to that total (`reconcile`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_tokperf.engines import (
    Chunk,
    Completion,
    EngineError,
    EngineInfo,
    MissingExtraError,
    Request,
    reconcile,
    sleep_off_loop,
)


def _json_loads() -> Callable[[bytes], Any]:
    """orjson's loads where installed (optional: about 3x faster for the few events
    parsed), else the standard library's."""
    try:
        import orjson
    except ModuleNotFoundError:  # pragma: no cover - depends on the environment
        return json.loads
    loads: Callable[[bytes], Any] = orjson.loads
    return loads


_loads = _json_loads()

SETTINGS = {
    "base_url",
    "model",
    "api",
    "api_key_env",
    "max_connections",
    "verify_tls",
    "tokenizer",
    "precision",
    "connect_timeout_s",
    "first_token_timeout_s",
    "idle_timeout_s",
    "total_timeout_s",
    "extra_body",
}
# an Offline run sends everything at once: a 24,576-sample run against a 2,048-batch
# server must not queue in the client, so the pool is as large as open files allow
MAX_CONNECTIONS = 65_536
CROSS_CHECKS = 8  # requests whose usage is checked against a user-named tokenizer
END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body
DONE = (False, "", None, True)  # what `_event` says of "data: [DONE]"
TAIL_BYTES = 1024  # enough raw bytes to hold the last events of a stream (usage, [DONE])
CACHED = 4096  # request bytes kept for prompts seen before (workloads cycle their prompts)
NS = 1_000_000_000
_clock = time.perf_counter_ns
UNFINISHED = "the stream ended before its final 'data: [DONE]'"


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    # None: the run's own timeout. An Offline request's first token legitimately waits
    # for the whole queue before it; the clock starts when the request is sent.
    first_token_s: float | None = None
    idle_s: float = 60.0  # between two reads with tokens of one stream
    total_s: float = 1800.0


class StreamError(Exception):
    """The server answered, but not with a well-formed stream; the message says how."""


Counter = Callable[[str], int]


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


def _event(payload: bytes) -> tuple[bool, str, int | None, bool]:
    """(is a token, its text, usage's completion tokens, is [DONE]) of one SSE data event."""
    if payload == b"[DONE]":
        return DONE
    try:
        event = _loads(payload)
    except ValueError:
        raise StreamError(f"bad JSON in a stream event: {payload[:120]!r}") from None
    if not isinstance(event, dict):
        raise StreamError(f"a stream event is not a JSON object: {payload[:120]!r}")
    if "error" in event:
        raise StreamError(f"the server reported an error mid-stream: {event['error']!r}")
    tokens = None
    usage = event.get("usage")
    if isinstance(usage, dict):
        tokens = usage.get("completion_tokens")
        if not isinstance(tokens, int):
            tokens = None
    choices = event.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        return False, "", tokens, False
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        text = delta.get("content") or ""
        token = bool(text or delta.get("reasoning_content") or delta.get("reasoning"))
    else:
        text = choice.get("text") or ""
        token = bool(text)
    return token, text, tokens, False


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


def _payloads(body: bytes) -> list[bytes]:
    return [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]


@dataclass
class _Read:
    """What the events of a finished stream say."""

    texts: list[str]
    usage: int | None
    trailing: int  # events after the last token
    done: bool


def _read_events(payloads: list[bytes], all_texts: bool) -> _Read:
    """Walk the events from the end; stop at the last token unless all texts are wanted."""
    texts: list[str] = []
    usage: int | None = None
    trailing = 0
    done = False
    seen_token = False
    for payload in reversed(payloads):
        token, text, tokens, is_done = _event(payload)
        done = done or is_done
        if usage is None and tokens is not None:
            usage = tokens
        if token or seen_token:
            seen_token = True
            if not all_texts:
                break
            texts.append(text)
        else:
            trailing += 1
    texts.reverse()
    return _Read(texts, usage, trailing, done)


def _tail_events(data: bytes, lo: int, cut: bool) -> tuple[int | None, int, bool] | None:
    """(usage's completion tokens, events after the last token, [DONE] seen) of a
    stream, read backwards from the end of `data` (its body's tail from `lo` on; `cut`:
    more of the body comes before) down to its last token. None when that is not in
    reach, or an event there cannot be parsed (one split by a chunk boundary, an error):
    then the whole body is read.

    Only the events from the last token on are parsed (two or three per stream).
    """
    usage: int | None = None
    trailing = 0
    done = False
    end = len(data)
    first = False  # the body's first line: nothing before it
    while True:
        at = data.rfind(b"\ndata:", lo, end) + 1  # a line's start; 0: none found
        if at == 0:
            if cut or not data.startswith(b"data:", lo):
                # the tail may begin mid-line; or a whole body without a token
                return None if cut else (usage, trailing, done)
            at, first = lo, True
        else:
            end = at - 1
        eol = data.find(b"\n", at)
        payload = data[at + 5 : eol if eol >= 0 else None].strip()
        if payload == b"[DONE]":
            done = True
        else:
            token, _, tokens, _ = _event(payload)
            if token:
                return usage, trailing, done
            if usage is None:
                usage = tokens
        trailing += 1
        if first:
            return usage, trailing, done


def _from_tail(conn: _Conn) -> Completion | None:
    """A perf run's settlement from the raw tail alone (usage, the events after the last
    token), without reading the body; None when the tail cannot say (no usage in it)."""
    last = conn.blocks[-1]
    if len(last) - (conn.skip if len(conn.blocks) == 1 else 0) > TAIL_BYTES:
        data, lo, cut = last, len(last) - TAIL_BYTES, True  # the last read holds the tail
    else:
        data, cut = conn.tail(TAIL_BYTES)
        lo = 0
    try:
        found = _tail_events(data, lo, cut)
    except StreamError:
        return None  # an event split by a chunk boundary, an error event: read it all
    if found is None or found[0] is None:
        return None  # counting needs the text
    usage, trailing, done = found
    if not done:
        raise StreamError(UNFINISHED)
    return Completion(usage, trailing, "", "usage", conn.ended_ns)


class _Pool:
    """Keep-alive connections of one event loop, at most `limit` at once.

    Its own slot count rather than an `asyncio.Semaphore`: taking a kept-alive
    connection is then a plain call, no coroutine, once per request on the hot path.
    """

    def __init__(self, engine: OpenAIEngine) -> None:
        self.engine = engine
        self.idle: list[_Conn] = []
        self.free = engine._max_connections  # slots neither in use nor handed to a waiter
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
        e = self.engine
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Conn, e._host, e._port, ssl=e._ssl, server_hostname=e._sni),
                e._timeouts.connect_s,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self._give()
            raise StreamError(f"cannot connect to {e._host}:{e._port}: {exc!r}") from None
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
        t = self.engine._timeouts
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


class OpenAIEngine:
    def __init__(
        self,
        base_url: str,
        model: str,
        api: str,
        headers: Mapping[str, str],
        max_connections: int,
        verify_tls: bool,
        timeouts: Timeouts,
        counter: Counter | None,
        info: EngineInfo,
        extra_body: Mapping[str, Any] | None = None,
        *,
        counted_by: str = "",
        cross_check: bool = False,
    ) -> None:
        self._extra_body = dict(extra_body or {})
        self.info = info
        path = "chat/completions" if api == "chat" else "completions"
        self._url = f"{base_url}/v1/{path}"
        url = urllib.parse.urlsplit(base_url)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._path = f"{url.path.rstrip('/')}/v1/{path}"
        self._ssl: ssl.SSLContext | None = None
        self._sni: str | None = None
        if url.scheme == "https":
            self._ssl = ssl.create_default_context()
            self._sni = self._host
            if not verify_tls:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._model = model
        self._api = api
        self._headers = dict(headers)
        self._max_connections = max_connections
        self._timeouts = timeouts
        self._counter = counter
        self._counted_by = counted_by
        self._cross_checks = CROSS_CHECKS if cross_check else 0
        self._pools: dict[asyncio.AbstractEventLoop, _Pool] = {}
        self._requests: dict[tuple[str, int], bytes] = {}

    def _pool(self) -> _Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._pools[loop] = _Pool(self)
        return pool

    def _request(self, request: Request) -> bytes:
        key = (request.prompt, request.max_tokens)
        data = self._requests.get(key)
        if data is None:
            data = self._build(request)
            if len(self._requests) < CACHED:
                self._requests[key] = data
        return data

    def _build(self, request: Request) -> bytes:
        body: dict[str, Any] = {
            "model": self._model,
            "max_tokens": request.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._extra_body,  # server-specific knobs, e.g. {"top_k": 1, "ignore_eos": true}
        }
        if self._api == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        data = json.dumps(body).encode()
        head = [
            f"POST {self._path} HTTP/1.1",
            f"Host: {self._host}:{self._port}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(data)}",
            *(f"{k}: {v}" for k, v in self._headers.items()),
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + data

    async def stream_reads(
        self, request: Request, times: list[int], counts: list[int], texts: bool
    ) -> Completion:
        pool = self._pool()
        data = self._request(request)
        for retry in (True, False):
            taken = pool.take()  # a kept-alive connection, at once: the common case
            if taken is None:
                conn, reused = await pool.acquire()
            else:
                conn, reused = taken, True
            reusable = False
            try:
                done = conn.send(data, times, counts)
                pool.watch(conn)
                await done
                reusable = conn.keep_alive
            except StreamError:
                # a kept-alive connection the server closed while it sat idle: once more
                if retry and reused and not conn.head and not conn.failed:
                    continue
                raise
            finally:
                pool.release(conn, reusable)
            break
        if conn.status >= 400:
            body = conn.body()
            body = _dechunk(body) if conn.chunked else body
            text = body[:300].decode("utf-8", "replace")
            raise StreamError(f"HTTP {conn.status} from {self._url}: {text}")
        if not texts and not self._cross_checks:
            settled = _from_tail(conn)
            if settled is not None:
                return settled
        return self._complete(conn, texts)

    def _complete(self, conn: _Conn, texts: bool) -> Completion:
        """Read every event of the body: its text, usage, what follows the last token.

        Counting the text (no usage; or a named tokenizer's check of usage) is handed
        back undone, as `Completion.count`: the driver takes it after the run.
        """
        body = conn.body()
        read = _read_events(_payloads(_dechunk(body) if conn.chunked else body), all_texts=True)
        if not read.done:
            raise StreamError(UNFINISHED)
        text = "".join(read.texts)
        kept, usage, counter, end = text if texts else "", read.usage, self._counter, conn.ended_ns
        if counter is None or (usage is not None and self._cross_checks <= 0):
            if usage is None:
                raise StreamError(
                    "the server sent no usage (stream_options.include_usage), has no tokenize "
                    "endpoint, and no tokenizer is set; set the engine's 'tokenizer' "
                    "(--tokperf-tokenizer) to the model's GGUF file or tokenizer.json"
                )
            return Completion(usage, read.trailing, kept, "usage", end)
        if usage is None:
            count = functools.partial(counter, text)
            return Completion(None, read.trailing, kept, self._counted_by, end, count)
        self._cross_checks -= 1
        check = functools.partial(_checked, counter, text, usage)
        return Completion(usage, read.trailing, kept, "usage", end, check)

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        """The generic protocol: the settled counts, yielded once the stream ended (for
        timing, the driver uses `stream_reads`, which keeps each read's arrival time)."""
        counts: list[int] = []
        done = await self.stream_reads(request, [], counts, texts=True)
        total = done.tokens
        if done.count is not None:  # no run to wait for: counted now, off the loop
            total = await asyncio.get_running_loop().run_in_executor(None, done.count)
        settled = [n for n in reconcile(counts, done.trailing, total) if n]
        for i, n in enumerate(settled):
            yield Chunk(n, done.text if i == len(settled) - 1 else "")

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        await asyncio.sleep(0)  # let the cancelled watchers finish


def _checked(counter: Counter, text: str, usage: int) -> int:
    """The server's `usage`, once a user-named tokenizer agrees with it (within 5%, or 2
    tokens): a tokenizer that does not match the served model would miscount."""
    counted = counter(text)
    if abs(counted - usage) > max(2, usage // 20):
        raise StreamError(
            f"the server's usage says {usage} output tokens but the tokenizer counts "
            f"{counted}: check that the tokenizer matches the served model"
        )
    return usage


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


def _tokens_in(answer: Any) -> int | None:
    if isinstance(answer, dict):
        if isinstance(answer.get("count"), int):
            return int(answer["count"])
        if isinstance(answer.get("tokens"), list):
            return len(answer["tokens"])
    return None


# (path, body) of the tokenize endpoints, in the order they are tried: vLLM and SGLang
# take "prompt", llama.cpp's server "content" (each ignores the other's key), and
# llama-cpp-python serves its own under /extras
ENDPOINTS: tuple[tuple[str, Callable[[str, str], dict[str, Any]]], ...] = (
    ("/tokenize", lambda model, text: {"model": model, "prompt": text, "content": text,
                                       "add_special_tokens": False, "add_special": False}),
    ("/extras/tokenize/count", lambda model, text: {"model": model, "input": text}),
)  # fmt: skip


def server_counter(
    base_url: str, model: str, headers: Mapping[str, str], timeout_s: float
) -> tuple[Counter, str] | None:
    """The server's own tokenize endpoint as a counter, when it has one that works."""
    for path, body in ENDPOINTS:
        url = base_url + path
        try:
            # what the empty text counts (a BOS some endpoints always add) is taken off
            offset = _tokens_in(_post_json(url, body(model, ""), headers, timeout_s))
            if offset is None:
                continue
        except (urllib.error.URLError, OSError, ValueError):
            continue

        def count(text: str, url: str = url, body: Any = body, offset: int = offset) -> int:
            n = _tokens_in(_post_json(url, body(model, text), headers, timeout_s))
            if n is None:
                raise StreamError(f"{url} answered without tokens")
            return n - offset

        return count, f"server tokenize endpoint {path}"
    return None


def file_counter(path: str) -> tuple[Counter, str]:
    """A local tokenizer: a GGUF file (llama.cpp, vocabulary only) or a tokenizer.json."""
    if not os.path.isfile(path):
        raise EngineError(f"tokenizer {path!r} is not a file (a GGUF file or a tokenizer.json)")
    if path.endswith(".json"):
        try:
            import tokenizers
        except ModuleNotFoundError:
            raise MissingExtraError("openai", "openai", "tokenizers") from None
        hf = tokenizers.Tokenizer.from_file(path)
        return (
            lambda text: len(hf.encode(text, add_special_tokens=False).ids),
            f"Hugging Face tokenizer {os.path.basename(path)}",
        )
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise MissingExtraError("openai", "embedded", "llama_cpp") from None
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    return (
        lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=False)),
        f"GGUF tokenizer {os.path.basename(path)}",
    )


def hub_cache() -> Path:
    """Where the Hugging Face hub keeps what it downloaded (nothing is downloaded here)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "huggingface") / "hub"


def find_tokenizer(names: Sequence[object], hub: Path) -> str | None:
    """The served model's own tokenizer, where this machine has it: the names the
    server lists it by (vLLM's `root` is the model's path; llama-cpp-python's `id` is
    its --model unless aliased) as an absolute path to a GGUF file or to a folder with
    a tokenizer.json, else a hub name's tokenizer.json in the Hugging Face cache `hub`.
    """
    for name in names:
        if not isinstance(name, str) or not name:
            continue
        path = Path(name).expanduser()
        if path.is_absolute():
            if path.is_file() and path.suffix.lower() == ".gguf":
                return str(path)
            if (path / "tokenizer.json").is_file():
                return str(path / "tokenizer.json")
            continue
        repo = hub / f"models--{name.replace('/', '--')}"
        try:  # the revision the hub calls main, else any snapshot that has one
            main = [(repo / "refs" / "main").read_text().strip()]
        except OSError:
            main = []
        for snapshot in [*main, *sorted(p.name for p in (repo / "snapshots").glob("*"))]:
            found = repo / "snapshots" / snapshot / "tokenizer.json"
            if found.is_file():
                return str(found)
    return None


def model_counter(entry: Mapping[str, Any], hub: Path) -> tuple[Counter, str] | None:
    """A counter from the served model's own tokenizer (`find_tokenizer`), when one is
    found and loads (its library installed); None otherwise."""
    path = find_tokenizer([entry.get("root"), entry.get("id")], hub)
    if path is None:
        return None
    try:
        counter, name = file_counter(path)
    except EngineError:  # a missing library, a file it cannot read: the next way counts
        return None
    return counter, f"{name} (the served model's)"


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


def load(settings: Mapping[str, Any], devices: int) -> OpenAIEngine:
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise EngineError(
            f"unknown openai engine settings {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(SETTINGS))}"
        )
    base_url = str(settings.get("base_url") or "").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise EngineError(
            f"the openai engine needs base_url, e.g. http://127.0.0.1:8000 "
            f"(--tokperf-base-url); got {base_url or 'nothing'!r}"
        )
    base_url = base_url.removesuffix("/v1")
    api = str(settings.get("api") or "chat")
    if api not in ("chat", "completions"):
        raise EngineError(f"openai engine api must be 'chat' or 'completions', got {api!r}")
    headers: dict[str, str] = {}
    key_env = settings.get("api_key_env")
    if key_env:
        key = os.environ.get(str(key_env))
        if not key:
            raise EngineError(f"api_key_env names {key_env!r}, but that variable is not set")
        headers["Authorization"] = f"Bearer {key}"
    first = settings.get("first_token_timeout_s")
    timeouts = Timeouts(
        connect_s=float(settings.get("connect_timeout_s") or Timeouts.connect_s),
        first_token_s=float(first) if first else None,
        idle_s=float(settings.get("idle_timeout_s") or Timeouts.idle_s),
        total_s=float(settings.get("total_timeout_s") or Timeouts.total_s),
    )
    try:
        models = _get_json(f"{base_url}/v1/models", headers, timeouts.connect_s)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EngineError(f"cannot list models at {base_url}/v1/models: {exc}") from None
    entries = {m.get("id"): m for m in models.get("data", []) if isinstance(m, dict)}
    served = list(entries)
    model = str(settings.get("model") or (served[0] if served else ""))
    if model not in served:
        raise EngineError(
            f"model {model!r} is not served at {base_url}; served: {', '.join(map(str, served))} "
            "(--tokperf-served-model)"
        )
    # usage when the server sends it; else a local tokenizer (the user's, else the
    # served model's own); the server's tokenize endpoint last. Any count but usage is
    # taken after the run (`Completion.count`).
    counter: tuple[Counter, str] | None = None
    if settings.get("tokenizer"):
        counter = file_counter(str(settings["tokenizer"]))
    else:
        counter = model_counter(entries[model], hub_cache()) or server_counter(
            base_url, model, headers, timeouts.connect_s
        )
    max_connections = _connections(settings.get("max_connections"))
    counting = "usage; without usage: " + (f"{counter[1]}, after the run" if counter else "none")
    info = EngineInfo(
        backend="openai",
        model=model,
        precision=str(settings.get("precision") or "served"),
        devices=devices,
        versions={"client": "pytest-tokperf asyncio HTTP/1.1"},
        settings={  # never the key itself: only the name of its variable
            "base_url": base_url,
            "api": api,
            "api_key_env": key_env,
            "max_connections": max_connections,
            "verify_tls": bool(settings.get("verify_tls", True)),
            "timeouts_s": dataclasses.asdict(timeouts),
            "extra_body": dict(settings.get("extra_body") or {}),
            "token_counting": counting,
        },
    )
    return OpenAIEngine(
        base_url,
        model,
        api,
        headers,
        max_connections,
        bool(settings.get("verify_tls", True)),
        timeouts,
        counter[0] if counter else None,
        info,
        settings.get("extra_body"),
        counted_by=counter[1] if counter else "",
        cross_check=bool(settings.get("tokenizer")),
    )
