"""SSE stream parsing: what the `data:` events of a finished (or starting) stream say.

No JSON is parsed per event on the hot path (`http.py` counts events with one
`bytes.count`): only the events before the first token, the last events (usage,
errors, `[DONE]`), and every event when the text is wanted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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

DONE = (False, "", None, True)  # what `_event` says of "data: [DONE]"
UNFINISHED = "the stream ended before its final 'data: [DONE]'"


class StreamError(Exception):
    """The server answered, but not with a well-formed stream; the message says how."""


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
