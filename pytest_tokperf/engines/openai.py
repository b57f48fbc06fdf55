"""Any OpenAI-compatible server (trtllm-serve, vLLM, SGLang, llama.cpp), streamed over HTTP.

One pooled aiohttp session per event loop. The stream is read in raw blocks and split
into SSE lines by hand; each event is timestamped by the driver as it is yielded, and
parsed only for what a record keeps (the text delta and the final `usage`).

Output tokens come from the server's `usage` (asked for with
`stream_options.include_usage`). Without it they come from a tokenizer the user names
(a GGUF file, read vocabulary-only by llama.cpp); with neither, the engine refuses to
guess. When both exist and disagree, the request's record says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from pytest_tokperf.engines import Chunk, EngineError, EngineInfo, MissingExtraError, Request

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


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    first_token_s: float = 120.0  # a long Offline queue legitimately delays the first token
    idle_s: float = 60.0  # between two chunks of one stream
    total_s: float = 1800.0


JSON = {"Content-Type": "application/json"}

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # the same API, from the package aiohttp itself uses there
    from async_timeout import timeout


class StreamError(Exception):
    """The server answered, but not with a well-formed stream; the message says how."""


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
        tokenizer: Any,
        info: EngineInfo,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self._extra_body = dict(extra_body or {})
        self.info = info
        self._url = f"{base_url}/v1/{'chat/completions' if api == 'chat' else 'completions'}"
        self._model = model
        self._api = api
        self._headers = dict(headers)
        self._max_connections = max_connections
        self._verify_tls = verify_tls
        self._timeouts = timeouts
        self._tokenizer = tokenizer
        self._sessions: dict[asyncio.AbstractEventLoop, Any] = {}

    def _session(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._verify_tls)
            t = self._timeouts
            limits = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s)
            session = aiohttp.ClientSession(
                connector=connector, timeout=limits, headers=self._headers
            )
            self._sessions[loop] = session
        return session

    def _body(self, request: Request) -> bytes:
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
        return json.dumps(body).encode()

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        session = self._session()
        loop = asyncio.get_running_loop()
        t = self._timeouts
        counted = 0
        try:
            # one deadline per request, pushed forward by each chunk: cheaper per token
            # than a timer per read, and it covers the wait for the headers too
            async with (
                timeout(t.first_token_s) as deadline,
                session.post(self._url, data=self._body(request), headers=JSON) as r,
            ):
                if r.status >= 400:
                    text = (await r.read())[:300].decode("utf-8", "replace")
                    raise StreamError(f"HTTP {r.status} from {self._url}: {text}")
                usage: int | None = None
                texts: list[str] = []
                done = False
                async for line in _sse_lines(r.content.iter_any()):
                    if not line.startswith(b"data:"):
                        continue  # SSE comments, event names, keep-alives
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    text, event_usage = _parse_event(payload)
                    if event_usage is not None:
                        usage = event_usage
                    if text:
                        counted += 1
                        texts.append(text)
                        deadline.reschedule(loop.time() + t.idle_s)
                        yield Chunk(1, text)
        except TimeoutError:
            if counted:
                raise StreamError(f"no data for the idle timeout of {t.idle_s:g} s") from None
            raise StreamError(
                f"no data within the first-token timeout of {t.first_token_s:g} s"
            ) from None
        if not done:
            raise StreamError("the stream ended before its final 'data: [DONE]'")
        total = self._output_tokens(usage, "".join(texts))
        if total != counted:
            # servers may send several tokens per event; the total is what counts
            yield Chunk(total - counted, "")

    def _output_tokens(self, usage: int | None, text: str) -> int:
        from_tokenizer = (
            len(self._tokenizer.tokenize(text.encode(), add_bos=False, special=False))
            if self._tokenizer is not None
            else None
        )
        if usage is not None:
            if from_tokenizer is not None and abs(from_tokenizer - usage) > max(2, usage // 20):
                raise StreamError(
                    f"the server's usage says {usage} output tokens but the tokenizer counts "
                    f"{from_tokenizer}: check that the tokenizer matches the served model"
                )
            return usage
        if from_tokenizer is not None:
            return from_tokenizer
        raise StreamError(
            "the server sent no usage (stream_options.include_usage) and no tokenizer is "
            "set; set the engine's 'tokenizer' to the model's GGUF file"
        )

    async def aclose(self) -> None:
        for session in self._sessions.values():
            if not session.closed:
                await session.close()
        self._sessions.clear()


async def _sse_lines(blocks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Split raw blocks into lines without copying more than the unfinished tail."""
    tail = b""
    async for block in blocks:
        parts = (tail + block).split(b"\n")
        tail = parts.pop()
        for part in parts:
            if part.strip():
                yield part
    if tail.strip():
        yield tail


def _parse_event(payload: bytes) -> tuple[str, int | None]:
    """(text delta, completion tokens from usage) of one SSE data event."""
    try:
        event = json.loads(payload)
    except ValueError:
        raise StreamError(f"bad JSON in a stream event: {payload[:120]!r}") from None
    if not isinstance(event, dict):
        raise StreamError(f"a stream event is not a JSON object: {payload[:120]!r}")
    if "error" in event:
        raise StreamError(f"the server reported an error mid-stream: {event['error']!r}")
    usage = event.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    text = ""
    choices = event.get("choices") or []
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta")
        text = (delta.get("content") if isinstance(delta, dict) else choice.get("text")) or ""
    return text, tokens if isinstance(tokens, int) else None


def _get_json(url: str, headers: Mapping[str, str], timeout_s: float) -> Any:
    req = urllib.request.Request(url, headers=dict(headers))
    with urllib.request.urlopen(req, timeout=timeout_s) as response:
        return json.loads(response.read())


def load(settings: Mapping[str, Any], devices: int) -> OpenAIEngine:
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise EngineError(
            f"unknown openai engine settings {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(SETTINGS))}"
        )
    try:
        import aiohttp
    except ModuleNotFoundError:
        raise MissingExtraError("openai", "openai", "aiohttp") from None
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
    timeouts = Timeouts(
        connect_s=float(settings.get("connect_timeout_s") or Timeouts.connect_s),
        first_token_s=float(settings.get("first_token_timeout_s") or Timeouts.first_token_s),
        idle_s=float(settings.get("idle_timeout_s") or Timeouts.idle_s),
        total_s=float(settings.get("total_timeout_s") or Timeouts.total_s),
    )
    try:
        models = _get_json(f"{base_url}/v1/models", headers, timeouts.connect_s)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EngineError(f"cannot list models at {base_url}/v1/models: {exc}") from None
    served = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]
    model = str(settings.get("model") or (served[0] if served else ""))
    if model not in served:
        raise EngineError(
            f"model {model!r} is not served at {base_url}; served: {', '.join(map(str, served))} "
            "(--tokperf-served-model)"
        )
    tokenizer = None
    if settings.get("tokenizer"):
        import llama_cpp

        tokenizer = llama_cpp.Llama(
            model_path=str(settings["tokenizer"]), vocab_only=True, verbose=False
        )
    info = EngineInfo(
        backend="openai",
        model=model,
        precision=str(settings.get("precision") or "served"),
        devices=devices,
        versions={"aiohttp": aiohttp.__version__},
        settings={  # never the key itself: only the name of its variable
            "base_url": base_url,
            "api": api,
            "api_key_env": key_env,
            "max_connections": int(settings.get("max_connections") or 1024),
            "verify_tls": bool(settings.get("verify_tls", True)),
            "timeouts_s": dataclasses.asdict(timeouts),
            "extra_body": dict(settings.get("extra_body") or {}),
        },
    )
    return OpenAIEngine(
        base_url,
        model,
        api,
        headers,
        int(settings.get("max_connections") or 1024),
        bool(settings.get("verify_tls", True)),
        timeouts,
        tokenizer,
        info,
        settings.get("extra_body"),
    )
