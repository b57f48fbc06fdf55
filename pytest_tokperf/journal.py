"""The results journal: every finished test's payload on disk the moment it is judged.

`--tokperf-json PATH` writes the JSON document once, at the end of the session. A
session that never reaches its end (SIGKILL, OOM kill, power to the controller cut
short of the disk) would lose every result, so the controller also appends each
payload to `PATH.journal` as one JSON line, flushed and fsynced before the next test
is judged. `python -m pytest_tokperf recover PATH.journal` rebuilds the document.

Lines: a header `{"kind": "header", "schema", "profile", "started", "pid", "document"}`
(the document's other fields as at the start: machine, packages, inventory),
then one `{"kind": "test", "payload": {...}}` per test, and `{"kind": "end",
"exitstatus": N}` when the session finished. A journal is overwritten when the next
session with the same PATH starts; it stays next to the JSON file otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pytest_tokperf import report

SUFFIX = ".journal"


def path_for(json_path: Path) -> Path:
    """Where the journal of the JSON results file `json_path` lives."""
    return json_path.with_name(json_path.name + SUFFIX)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Journal:
    """An open journal; every line reaches the disk before `append` returns."""

    def __init__(self, path: Path, document: Mapping[str, Any]) -> None:
        """Start the journal at `path` (truncating an earlier session's)."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = path.open("w", encoding="utf-8")
        head = {k: v for k, v in document.items() if k not in ("profile", "summary", "tests")}
        try:
            self._write({"kind": "header", "schema": report.SCHEMA, "profile": document["profile"],
                         "started": _now(), "pid": os.getpid(), "document": head})  # fmt: skip
        except OSError:
            with contextlib.suppress(OSError):  # its buffer cannot be flushed either
                self.close()
            raise

    def _write(self, line: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: the journal is closed")
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, payload: Mapping[str, Any]) -> None:
        self._write({"kind": "test", "payload": payload})

    def close(self, exitstatus: int | None = None) -> None:
        """Mark the session finished (when `exitstatus` is given) and close."""
        if self._file is None:
            return
        try:
            if exitstatus is not None:
                self._write({"kind": "end", "exitstatus": exitstatus, "finished": _now()})
        finally:
            file, self._file = self._file, None
            file.close()


@dataclass(frozen=True)
class Read:
    """What a journal holds: its header, the payloads, and how it ended."""

    header: dict[str, Any]
    payloads: tuple[dict[str, Any], ...]
    finished: bool  # the session wrote its end line
    torn: bool  # the last line was cut short (the process died while writing it)


def read(path: Path) -> Read:
    """Parse a journal; a bad line is a ValueError naming the file and line.

    Only the last line may be cut short: the process died writing it, and that one
    test (the one being written) is the most a crash can lose.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the journal ({exc.strerror})") from None
    lines = text.split("\n")
    torn = False
    header: dict[str, Any] | None = None
    payloads: list[dict[str, Any]] = []
    finished = False
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except ValueError:
            if number == len(lines):  # no newline after it: cut short
                torn = True  # the line the process was writing when it died
                break
            raise ValueError(f"{where}: not a journal line (invalid JSON)") from None
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if header is None:
            if (
                kind != "header"
                or entry.get("schema") != report.SCHEMA
                or not isinstance(entry.get("document"), dict)
            ):
                raise ValueError(
                    f"{where}: not a pytest-tokperf journal (expected a header line of "
                    f"schema {report.SCHEMA})"
                )
            header = entry
        elif kind == "test" and isinstance(entry.get("payload"), dict):
            payloads.append(entry["payload"])
        elif kind == "end":
            finished = True
        else:
            raise ValueError(f"{where}: unknown journal line kind {kind!r}")
    if header is None:
        raise ValueError(f"{path}: empty journal (no header line)")
    return Read(header, tuple(payloads), finished, torn)


def document(journal: Read, source: Path) -> dict[str, Any]:
    """The results document (the same schema as `report.document`) from a journal.

    `recovered` (an extra key) says where it came from and whether the session ended.
    """
    payloads = sorted(journal.payloads, key=lambda p: str(p.get("nodeid")))
    head = journal.header["document"]
    return {
        **{k: v for k, v in head.items() if k != "inventory"},
        "profile": journal.header["profile"],
        "inventory": head.get("inventory"),
        "summary": {s: sum(1 for p in payloads if p.get("verdict") == s) for s in report.VERDICTS},
        "tests": payloads,
        "recovered": {
            "journal": str(source),
            "at": _now(),
            "session_finished": journal.finished,
            "last_line_torn": journal.torn,
        },
    }


def recover(source: Path, out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the document rebuilt from the journal `source`; by default where the
    session meant to write it (the journal's name without `.journal`)."""
    doc = document(read(source), source)
    if out is None:
        name = source.name
        out = source.with_name(name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name + ".json")
    report.write_json(out, doc)
    return out, doc
