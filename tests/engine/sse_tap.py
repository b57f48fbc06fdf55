"""An independent raw-socket client for a streaming chat server, placed as a relay.

It stands between the plugin and a real server and times what the server sends with
its own code (plain blocking sockets and `select`, nothing of pytest-tokperf), so both
clients see the very same streams: per chat request it stamps, right after each
`recv` and before passing the bytes on, when the request was complete, the first
read with a non-empty `delta.content`, the last such read, and the read that ended
the chunked body, and counts the events with content. One JSON line per finished
response goes to --log.

Run: python sse_tap.py --port N --upstream http://127.0.0.1:M --log FILE
"""

from __future__ import annotations

import argparse
import json
import re
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

CONTENT = re.compile(rb'"content": "(?!")')  # a delta with text (llama-cpp-python's JSON)
END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body


@dataclass
class Pair:
    """One plugin-side connection and its upstream connection."""

    down: socket.socket
    up: socket.socket
    asked: bytes = b""  # request bytes not yet parsed
    waiting: list[dict[str, Any]] = field(default_factory=list)  # requests, in order
    tail: bytes = b""  # the response's last bytes, for an END split over reads


def requests_in(pair: Pair, now: int) -> None:
    """Complete requests in what the plugin sent: their prompt and when they were whole."""
    while True:
        head_end = pair.asked.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = pair.asked[:head_end].lower() + b"\r\n"
        at = head.find(b"content-length:")
        length = int(head[at + 15 : head.find(b"\r\n", at)].strip() or 0) if at >= 0 else 0
        if len(pair.asked) < head_end + 4 + length:
            return
        body = pair.asked[head_end + 4 : head_end + 4 + length]
        pair.asked = pair.asked[head_end + 4 + length :]
        if head.startswith(b"post ") and b"/chat/completions" in head.split(b"\r\n")[0]:
            prompt = json.loads(body)["messages"][-1]["content"]
            pair.waiting.append({"prompt": prompt, "request_ns": now})


def answer_in(pair: Pair, data: bytes, now: int, log: TextIO) -> None:
    """Time one read of the current response; at its end, log it."""
    if not pair.waiting:
        return
    current = pair.waiting[0]
    tokens = len(CONTENT.findall(data))  # llama-cpp-python: one token an event
    if tokens:
        current.setdefault("first_ns", now)
        current["last_token_ns"] = now
        current["events"] = current.get("events", 0) + tokens
    pair.tail = (pair.tail + data)[-len(END) :]
    if pair.tail == END:
        current["end_ns"] = now
        pair.waiting.pop(0)
        pair.tail = b""
        log.write(json.dumps(current) + "\n")
        log.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    host, _, port = args.upstream.removeprefix("http://").rstrip("/").partition(":")
    listener = socket.create_server(("127.0.0.1", args.port))
    pairs: dict[socket.socket, Pair] = {}
    with open(args.log, "a") as log:
        while True:
            ready, _, _ = select.select([listener, *pairs], [], [])
            for sock in ready:
                if sock is listener:
                    down, _ = listener.accept()
                    up = socket.create_connection((host, int(port)))
                    for s in (down, up):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    pair = Pair(down, up)
                    pairs[down] = pairs[up] = pair
                    continue
                if sock not in pairs:  # closed with its pair earlier in this round
                    continue
                pair = pairs[sock]
                try:
                    data = sock.recv(262144)
                    now = time.perf_counter_ns()  # the read's time, before anything else
                    if data:
                        (pair.down if sock is pair.up else pair.up).sendall(data)
                except OSError:  # a reset (a client closing abruptly): as a close
                    data = b""
                if not data:
                    for s in (pair.down, pair.up):
                        pairs.pop(s, None)
                        s.close()
                elif sock is pair.up:
                    answer_in(pair, data, now, log)
                else:
                    pair.asked += data
                    requests_in(pair, now)


if __name__ == "__main__":
    main()
