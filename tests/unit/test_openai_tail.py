"""The openai engine's hot path on recorded bytes: a response read as it arrives (the
head parsed once, no read copied, each read's events counted once), and a perf run's
settlement from the raw tail alone, checked against reading every event."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_tokperf.engines.openai import engine, http, stream

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def event(body: object) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def token(text: str = " tok") -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}}]})


ROLE = event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
FINISH = event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = event({"choices": [], "usage": {"completion_tokens": 7, "prompt_tokens": 1}})
DONE = b"data: [DONE]\n\n"


def chunked(*writes: bytes) -> bytes:
    """A chunked body, one chunk per write (as aiohttp sends each `write`)."""
    return b"".join(b"%x\r\n%s\r\n" % (len(w), w) for w in writes) + b"0\r\n\r\n"


def receive(reads: list[bytes]) -> tuple[http._Conn, list[int]]:
    """A connection fed these reads after sending a request; the counts it reported."""
    loop = asyncio.new_event_loop()
    counts: list[int] = []

    class Transport:
        def write(self, data: bytes) -> None:
            pass

    conn = http._Conn()
    conn.transport = Transport()  # type: ignore[assignment]

    async def run() -> None:
        conn.send(b"", [], counts)
        for data in reads:
            conn.data_received(data)

    loop.run_until_complete(run())
    loop.close()
    assert conn.done is not None and conn.done.done()
    assert conn.done.exception() is None  # whole, well-formed streams only
    return conn, counts


def full_read(conn: http._Conn) -> tuple[int | None, int, bool]:
    """What reading every event of the body says (the path texts=True takes)."""
    read = stream._read_events(stream._payloads(http._dechunk(conn.body())), all_texts=True)
    return read.usage, read.trailing, read.done


def test_a_burst_in_one_read_is_counted_once_from_its_first_token() -> None:
    conn, counts = receive([HEAD + chunked(ROLE + token() * 7, FINISH + USAGE + DONE)])
    assert conn.status == 200 and conn.chunked and conn.done is not None and conn.done.done()
    assert conn.skip == len(HEAD) and conn.blocks == [HEAD + conn.body()]  # not copied
    assert counts == [10]  # 7 tokens, the finish event, usage, [DONE]; not the role
    assert conn.body() == chunked(ROLE + token() * 7, FINISH + USAGE + DONE)
    settled = engine._from_tail(conn)
    assert settled is not None and (settled.tokens, settled.trailing) == (7, 3)
    assert (settled.tokens, settled.trailing, True) == full_read(conn)


def test_a_head_and_a_first_line_split_over_reads() -> None:
    data = HEAD + chunked(ROLE, token() * 7, USAGE + DONE)
    cuts = [20, len(HEAD) + 30, len(HEAD) + 200]
    reads = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    conn, counts = receive(reads)
    assert conn.done is not None and conn.done.done() and conn.body() == data[len(HEAD) :]
    assert sum(counts) == 9  # the role-only delta before the first token is not counted
    settled = engine._from_tail(conn)
    assert settled is not None and (settled.tokens, settled.trailing) == (7, 2)


@given(
    st.lists(st.sampled_from(["token", "role", "finish", "usage"]), min_size=1, max_size=40),
    st.integers(1, 4000),
    st.integers(1, 12),
)
def test_the_tail_says_what_reading_every_event_says(
    kinds: list[str], split: int, per_write: int
) -> None:
    events = {"token": token(), "role": ROLE, "finish": FINISH, "usage": USAGE}
    sent = [events[k] for k in kinds] + [DONE]
    # servers write whole events (one chunk per write); the client's reads cut anywhere
    writes = [b"".join(sent[i : i + per_write]) for i in range(0, len(sent), per_write)]
    data = HEAD + chunked(*writes)
    reads = [data[i : i + split] for i in range(0, len(data), split)]
    conn, _ = receive(reads)
    assert conn.body() == data[len(HEAD) :]  # every byte kept, in order
    settled = engine._from_tail(conn)
    usage, trailing, done = full_read(conn)
    assert done
    if settled is None:  # the tail could not say: no usage after the last token, or that
        last = data.rfind(token())  # token is too far back: the whole body is read instead
        after = kinds[len(kinds) - kinds[::-1].index("token") :] if "token" in kinds else kinds
        assert "usage" not in after or len(data) - last > engine.TAIL_BYTES - 2
        return
    assert (settled.tokens, settled.trailing) == (usage, trailing)


def test_an_unfinished_stream_is_an_error_from_the_tail_too() -> None:
    conn, _ = receive([HEAD + chunked(token() * 3 + USAGE)])  # no [DONE]
    with pytest.raises(stream.StreamError, match=r"before its final 'data: \[DONE\]'"):
        engine._from_tail(conn)


def test_an_error_status_records_no_reads_and_keeps_only_times_for_the_idle_timeout() -> None:
    # an SSE-style error body from a proxy, still open: nothing is counted for the
    # request, and what the idle timeout looks at is a read's time, never a count
    loop = asyncio.new_event_loop()

    class Transport:
        def write(self, data: bytes) -> None:
            pass

    conn = http._Conn()
    conn.transport = Transport()  # type: ignore[assignment]
    times: list[int] = []
    counts: list[int] = []
    head = b"HTTP/1.1 503 busy\r\ntransfer-encoding: chunked\r\n\r\n"
    error = b'data: {"error":"overloaded"}\n\n'

    async def run() -> None:
        conn.send(b"", times, counts)
        conn.data_received(head + b"%x\r\n%s\r\n" % (len(error), error))
        conn.data_received(b"%x\r\n%s\r\n" % (len(error), error))

    loop.run_until_complete(run())
    loop.close()
    assert conn.status == 503 and times == [] and counts == []
    assert conn.times and all(t >= conn.sent_ns for t in conn.times)
