"""The raw-socket floor: the least a Python client can do to time a streamed answer.

A minimal `asyncio.Protocol` HTTP/1.1 client on uvloop: `concurrency` keep-alive
connections, each sending one streaming chat request after another, kept open from one
run to the next on an event loop (as the plugin's pool keeps its). Per socket read
it counts the SSE `data:` events and timestamps the read; nothing else (no JSON, no
status check, no timeouts). It knows the null server's stream: each answer ends with a
usage event and `data: [DONE]`, which are not tokens. benchmarks/client_overhead.py
measures the plugin's client against this floor in the same run.

Run: python benchmarks/floor_client.py --url http://127.0.0.1:8000 [--requests 640]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse

END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body
NOT_TOKENS = 2  # the usage event and [DONE]


class Floor(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.events = 0
        self.times: list[int] = []
        self.prev = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        n = data.count(b"data:")
        if n:
            self.times.append(time.perf_counter_ns())
            self.events += n
        if data.endswith(END) or (len(data) < len(END) and (self.prev + data).endswith(END)):
            assert self.done is not None
            self.done.set_result(None)
        self.prev = data


async def run(base_url: str, requests: int, tokens: int, concurrency: int) -> int:
    """Stream `requests` answers of `tokens` tokens, `concurrency` at a time; tokens seen."""
    url = urllib.parse.urlsplit(base_url)
    body = json.dumps(
        {
            "model": "null",
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "x"}],
        }
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    pool = [c for c in POOLS.get((loop, base_url), []) if not c.closed]
    while len(pool) < concurrency:
        _, conn = await loop.create_connection(Floor, url.hostname, url.port)
        pool.append(conn)
    POOLS[(loop, base_url)] = pool
    left = [requests]
    seen = [0]

    async def worker(conn: Floor) -> None:
        assert conn.transport is not None
        while left[0] > 0:
            left[0] -= 1
            conn.events = 0
            conn.done = loop.create_future()
            conn.transport.write(request)
            await conn.done
            seen[0] += conn.events - NOT_TOKENS

    await asyncio.gather(*(worker(conn) for conn in pool[:concurrency]))
    return seen[0]


# keep-alive connections by (event loop, server), kept between runs
POOLS: dict[tuple[asyncio.AbstractEventLoop, str], list[Floor]] = {}


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    print(uvloop.run(run(args.url, args.requests, args.tokens, args.concurrency)), "tokens")


if __name__ == "__main__":
    main()
