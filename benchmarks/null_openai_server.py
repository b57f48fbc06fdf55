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

`--workers N --cores 0-7` serves from N processes, worker i pinned to the i-th of those
cores: the parent binds N listening sockets to the one port with SO_REUSEPORT before
any worker starts, so the kernel spreads connections over all N from the first one
(a worker that starts late finds its connections waiting in its backlog), then runs
the workers and waits (benchmarks/gpu_check.py, the client at scale).

Run: python benchmarks/null_openai_server.py --port 8000 [--pace-ms 5 | --whole]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
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


def cpu_list(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8] (taskset's list format)."""
    cores: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def serve_workers(args: argparse.Namespace) -> None:
    """N workers on one port: every socket bound and listening before any worker runs."""
    cores = cpu_list(args.cores) if args.cores else sorted(os.sched_getaffinity(0))
    socks = []
    for _ in range(args.workers):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(4096)
        socks.append(sock)
    same = ["--port", str(args.port), "--pace-ms", str(args.pace_ms)]
    same += ["--whole"] * args.whole + (["--metrics", args.metrics] if args.metrics else [])
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, *same, "--fd", str(s.fileno()), "--core", str(core)],
            pass_fds=(s.fileno(),),
        )
        for s, core in zip(socks, [cores[i % len(cores)] for i in range(args.workers)], strict=True)
    ]
    for worker in workers:
        worker.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pace-ms", type=float, default=0.0)
    parser.add_argument("--whole", action="store_true", help="each answer in one write")
    parser.add_argument("--metrics", help="serve this file as /metrics")
    parser.add_argument("--workers", type=int, default=1, help="processes on the one port")
    parser.add_argument("--cores", default="", help="the workers' cores, e.g. 0-7")
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # a worker's socket
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)  # a worker's core
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # thousands of streams at once
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.workers > 1:
        serve_workers(args)
        return
    if args.core is not None:  # a worker: pinned, and gone when its parent goes
        os.sched_setaffinity(0, {args.core})
        if sys.platform.startswith("linux"):
            import ctypes
            import signal

            ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    app = make_app(args.pace_ms / 1000, args.whole, args.metrics)
    if args.fd is not None:
        web.run_app(app, sock=socket.socket(fileno=args.fd), print=None)
    else:
        web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
