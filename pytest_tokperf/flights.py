"""A run's requests in flight and done: what the driver streams into, what a watcher reads.

Each request issued is a `Live` until it ends as a `RequestRecord`; `Flights` holds a
run's (issued, in flight, finished) so it can be watched (progress, early stopping, a
client process's looks) and stopped from outside, and `driver` streams into both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_tokperf.engines import Completion, Request, reconcile
from pytest_tokperf.records import RequestRecord

_clock = time.perf_counter_ns
TIMED_OUT = "cancelled: the run's time limit was reached before this request completed"

_new = object.__new__
_setattr = object.__setattr__


class Live:
    """A request in flight; the watcher snapshots it without waiting for the end.

    A plain class with slots: one is made per request, on the closed loop's hot path.
    """

    __slots__ = (
        "chunk_ns",
        "chunk_tokens",
        "counted_by",
        "final",
        "issue_ns",
        "later",
        "request",
        "scheduled_ns",
        "texts",
        "token_ids",
    )

    def __init__(self, request: Request, issue_ns: int, scheduled_ns: int | None) -> None:
        self.request = request
        self.issue_ns = issue_ns
        self.scheduled_ns = scheduled_ns
        self.chunk_ns: list[int] = []
        self.chunk_tokens: list[int] = []
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.counted_by = ""
        self.final: RequestRecord | None = None  # its record, once the request ended
        # the count the engine deferred, and who counts: taken once the run is over
        self.later: tuple[Callable[[], int], str] | None = None

    def settle(self, done: Completion) -> None:
        """The per-read counts settled to the stream's total; reads left with none drop out."""
        counts, trailing, total = self.chunk_tokens, done.trailing, done.tokens
        last = counts[-1] if counts else 0
        if (
            (last > trailing or (last == trailing and len(counts) > 1))
            and (total is None or sum(counts) - trailing == total)
            and 0 not in counts
        ):
            # the common case, `reconcile`'s answer at a glance: what followed the last
            # token came in the last read (alone, when a server writes each event on
            # its own: then that read drops out), the events counted are the total
            if last > trailing:
                counts[-1] -= trailing
            else:
                counts.pop()
                self.chunk_ns.pop()
            self.texts = [done.text]
            self.counted_by = done.counted_by
            return
        counts = reconcile(counts, trailing, total)
        if 0 in counts:
            pairs = [(at, n) for at, n in zip(self.chunk_ns, counts, strict=True) if n > 0]
            self.chunk_ns = [at for at, _ in pairs]
            counts = [n for _, n in pairs]
        if done.tokens and not counts:  # no read was counted: the tokens came at the end
            self.chunk_ns, counts = [done.end_ns or _clock()], [done.tokens]
        self.chunk_tokens = counts
        self.texts = [done.text]
        self.counted_by = done.counted_by

    def record(self, end_ns: int, error: str | None = None) -> RequestRecord:
        # made as unpickling makes one, its fields set at once: a frozen dataclass's
        # __init__ sets each through object.__setattr__, three times the cost, and this
        # runs once per request (tests/unit/test_driver.py checks it equals the real one)
        record = _new(RequestRecord)
        _setattr(
            record,
            "__dict__",
            {
                "id": self.request.id,
                "issue_ns": self.issue_ns,
                "end_ns": end_ns,
                "chunk_ns": tuple(self.chunk_ns),
                "chunk_tokens": tuple(self.chunk_tokens),
                "text": "".join(self.texts),
                "error": error,
                "token_ids": tuple(self.token_ids),
                "scheduled_ns": self.scheduled_ns,
            },
        )
        return record


@dataclass
class Flights:
    """A run's requests: issued, in flight and finished, so it can be watched (progress,
    early stopping, the looks of several client processes) and stopped from outside."""

    halt: asyncio.Event = field(default_factory=asyncio.Event)  # set: issue no more
    stopped: str | None = None  # why it was stopped from outside (Ctrl-C): requests cut
    ended: tuple[str, int] | None = None  # why issuing ended early, and when
    flying: list[asyncio.Task[Any]] = field(default_factory=list)  # what streams requests
    lives: list[Live] = field(default_factory=list)  # every request issued, in issue order
    finished: list[RequestRecord] = field(default_factory=list)  # records, as they ended
    _seen: int = 0  # looks: finished records already handed out
    _open: int = 0  # looks: lives before this one have all finished

    def begin(self) -> None:
        """The measured run starts: what the warm-up issued is forgotten."""
        self.flying, self.lives, self.finished = [], [], []
        self._seen = self._open = 0

    def cut(self) -> str:
        """The error of a request cut short: by the time limit, or by `stop`."""
        return (
            TIMED_OUT if self.stopped is None else f"{self.stopped} before this request completed"
        )

    def stop(self, reason: str) -> None:
        """Issue no more; every request in flight ends now, as a record failed with `reason`."""
        self.stopped = reason
        self.halt.set()
        for task in self.flying:
            task.cancel()  # a no-op for finished tasks

    def end_issuing(self, reason: str, at_ns: int) -> None:
        """Issue no more from `at_ns` on (the end of the run's window); requests in
        flight finish. The first reason given is the one kept."""
        if self.ended is None:
            self.ended = (reason, at_ns)
        self.halt.set()

    def snapshot(self, now: int) -> list[RequestRecord]:
        """Every record so far in issue order, requests in flight cut at `now`."""
        return [lv.final if lv.final is not None else lv.record(now) for lv in self.lives]

    def look(self, now: int) -> tuple[list[RequestRecord], list[RequestRecord]]:
        """What changed since the last look: the records finished since, and every
        request in flight cut at `now` (a client process sends these to the parent)."""
        new = self.finished[self._seen :]
        self._seen += len(new)
        lives = self.lives
        while self._open < len(lives) and lives[self._open].final is not None:
            self._open += 1
        flying = [lv.record(now) for lv in lives[self._open :] if lv.final is None]
        return new, flying
