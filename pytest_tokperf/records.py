"""What happened to each request (`RequestRecord`, which the driver makes) and the raw
records file: one JSON line per measured request, on a wall clock.

`--tokperf-records PATH` appends, after each measured run, one row per request:
{"test", "run", "node", "id", "scheduled", "issue", "first", "end", "tokens",
"error", "chunks"}. The driver times requests with `perf_counter_ns`, which means
nothing outside its process; every timestamp here is a wall-clock nanosecond value
`anchor_wall_ns + (perf_ns - anchor_perf_ns)`, the anchor read once per run, so
runs of different processes or machines can be laid side by side (merge) and every
metric can be recomputed from the file (`python -m pytest_tokperf recompute`).
Rows of a chunk carrying more than one token add "chunk_tokens"; a run bounded by
time adds "window_end" (when it stopped issuing).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request, in `perf_counter_ns` nanoseconds.

    `scheduled_ns` is the seeded arrival time a server run meant to issue at (None in
    other scenarios): `issue_ns - scheduled_ns` is the driver's own lag.
    """

    id: str
    issue_ns: int
    end_ns: int
    chunk_ns: tuple[int, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    text: str = ""
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # when the engine reports them (accuracy parity)
    scheduled_ns: int | None = None

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def first_chunk_ns(self) -> int | None:
        return self.chunk_ns[0] if self.chunk_ns else None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Anchor:
    """A wall-clock and a perf-counter reading taken together."""

    wall_ns: int
    perf_ns: int

    def wall(self, perf_ns: int) -> int:
        return self.wall_ns + (perf_ns - self.perf_ns)


def anchor() -> Anchor:
    """Read both clocks back to back (once per run)."""
    perf = time.perf_counter_ns()
    wall = time.time_ns()
    return Anchor(wall, (perf + time.perf_counter_ns()) // 2)


def to_rows(
    records: Sequence[RequestRecord],
    anchor: Anchor,
    test: str,
    run: int,
    node: str,
    window_end_ns: int | None = None,
) -> list[dict[str, Any]]:
    """JSON rows of one run's records, every timestamp on the wall clock."""
    rows = []
    for r in records:
        row: dict[str, Any] = {
            "test": test,
            "run": run,
            "node": node,
            "id": r.id,
            "scheduled": None if r.scheduled_ns is None else anchor.wall(r.scheduled_ns),
            "issue": anchor.wall(r.issue_ns),
            "first": None if r.first_chunk_ns is None else anchor.wall(r.first_chunk_ns),
            "end": anchor.wall(r.end_ns),
            "tokens": r.output_tokens,
            "error": r.error,
            "chunks": [anchor.wall(t) for t in r.chunk_ns],
        }
        if any(n != 1 for n in r.chunk_tokens):
            row["chunk_tokens"] = list(r.chunk_tokens)
        if window_end_ns is not None:
            row["window_end"] = anchor.wall(window_end_ns)
        rows.append(row)
    return rows


def append(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows in one write on an O_APPEND file, then fsync: processes sharing the
    file (xdist workers) never interleave lines, and a run's rows survive a later crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """Appends each measured run's rows to one file (under MPI: PATH.rankN per rank)."""

    def __init__(self, path: Path, node: str, rank: int | None = None) -> None:
        self.path = path if rank is None else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        self.node = node

    def write(
        self, records: Sequence[RequestRecord], anchor: Anchor, test: str, run: int,
        window_end_ns: int | None = None,
    ) -> None:  # fmt: skip
        append(self.path, to_rows(records, anchor, test, run, self.node, window_end_ns))


def record(row: dict[str, Any]) -> RequestRecord:
    """A row back as a RequestRecord (its times are wall-clock ns; metrics use differences).

    Without "chunks", the first token arrives at "first" and the rest at "end".
    """
    chunks = row.get("chunks")
    tokens = int(row["tokens"])
    if chunks is not None:
        chunk_ns = tuple(int(t) for t in chunks)
        counts = row.get("chunk_tokens") or [1] * len(chunk_ns)
    elif row["first"] is None or tokens == 0:
        chunk_ns, counts = (), []
    elif tokens == 1:
        chunk_ns, counts = (int(row["first"]),), [1]
    else:
        chunk_ns, counts = (int(row["first"]), int(row["end"])), [1, tokens - 1]
    return RequestRecord(
        id=str(row["id"]),
        issue_ns=int(row["issue"]),
        end_ns=int(row["end"]),
        chunk_ns=chunk_ns,
        chunk_tokens=tuple(int(n) for n in counts),
        error=row.get("error"),
        scheduled_ns=None if row.get("scheduled") is None else int(row["scheduled"]),
    )


RunKey = tuple[str, int, str]  # (test, run, node)


def read_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read(path: Path) -> list[RequestRecord]:
    """Every record in the file, in file order."""
    return [record(row) for row in read_rows(path)]


def runs(rows: Iterable[dict[str, Any]]) -> dict[RunKey, tuple[list[RequestRecord], int | None]]:
    """Records grouped by (test, run, node), each with the run's window end (or None)."""
    out: dict[RunKey, tuple[list[RequestRecord], int | None]] = {}
    for row in rows:
        key = (str(row["test"]), int(row["run"]), str(row["node"]))
        found, _ = out.setdefault(key, ([], row.get("window_end")))
        found.append(record(row))
    return out
