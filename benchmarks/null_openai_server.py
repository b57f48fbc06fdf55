"""A null OpenAI-compatible server, so a client's own cost per streamed token can be
measured: it streams `max_tokens` one-token chunks, then a usage event and [DONE].

How it writes the chunks of each stream:
- default ("burst"): one write per chunk, back to back, as fast as it can;
- `--pace-ms P` ("paced"): one write per chunk per decode step, a step every P
  milliseconds for all streams at once, as a batching server's decode steps are (each
  running sequence gets its next token in the same step), so every step costs the
  client a wake-up and every token a read. The steps are one grid for all streams:
  with a timer per stream, the streams' phases fall differently in every run, and so
  does how many tokens one wake-up of the client serves;
- `--whole` ("one-write"): all chunks in one write, so a client reads a whole answer
  in one or two reads and what is left of its cost is per request.

`--metrics FILE` serves FILE as its Prometheus /metrics page (benchmarks/scrape_stall.py).

Run: python benchmarks/null_openai_server.py --port 8000 [--pace-ms 5 | --whole]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from aiohttp import web

CHUNK = (
    b'data: {"object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":" tok"},"finish_reason":null}]}\n\n'
)


def make_app(pace_s: float, whole: bool = False, metrics: str | None = None) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "null"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens", 16))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if whole:
            await response.write(CHUNK * n)
        else:
            clock = asyncio.get_running_loop().time
            for _ in range(n):
                await response.write(CHUNK)
                if pace_s > 0:  # until the next step of the one grid
                    await asyncio.sleep(pace_s - clock() % pace_s)
        usage = {"choices": [], "usage": {"completion_tokens": n, "prompt_tokens": 1}}
        await response.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    text = Path(metrics).read_text() if metrics else ""  # read once, not per scrape

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.add_routes([web.get("/v1/models", models), web.post("/v1/chat/completions", chat)])
    if metrics:
        app.add_routes([web.get("/metrics", page)])
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pace-ms", type=float, default=0.0)
    parser.add_argument("--whole", action="store_true", help="each answer in one write")
    parser.add_argument("--metrics", help="serve this file as /metrics")
    args = parser.parse_args()
    web.run_app(
        make_app(args.pace_ms / 1000, args.whole, args.metrics),
        host="127.0.0.1",
        port=args.port,
        print=None,
    )


if __name__ == "__main__":
    main()
