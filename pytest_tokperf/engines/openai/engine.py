"""The openai engine: requests built and streamed through the pool, settled into counts.

A request's counts come from the server's `usage`; without it the text is counted
after the run (`Completion.count`, `tokens.py`): a round trip to a busy server,
queued behind the other requests' generation, must not delay the next request. The
per-read counts are then settled to that total (`reconcile`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import ssl
import urllib.error
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pytest_tokperf.engines import (
    Chunk,
    Completion,
    EngineError,
    EngineInfo,
    Request,
    reconcile,
)
from pytest_tokperf.engines.openai.http import (
    Timeouts,
    _Conn,
    _connections,
    _dechunk,
    _get_json,
    _Pool,
)
from pytest_tokperf.engines.openai.stream import (
    UNFINISHED,
    StreamError,
    _payloads,
    _read_events,
    _tail_events,
)
from pytest_tokperf.engines.openai.tokens import (
    Counter,
    _checked,
    file_counter,
    hub_cache,
    model_counter,
    server_counter,
)

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

CROSS_CHECKS = 8  # requests whose usage is checked against a user-named tokenizer
TAIL_BYTES = 1024  # enough raw bytes to hold the last events of a stream (usage, [DONE])
CACHED = 4096  # request bytes kept for prompts seen before (workloads cycle their prompts)


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
            pool = self._pools[loop] = _Pool(
                self._host,
                self._port,
                self._ssl,
                self._sni,
                self._max_connections,
                self._timeouts,
            )
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
