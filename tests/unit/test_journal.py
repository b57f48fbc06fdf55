"""The results journal: lines on disk as tests finish, and the document rebuilt from them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pytest_tokperf import journal, report
from pytest_tokperf.__main__ import main
from pytest_tokperf.profiles import BUILTIN

PAYLOADS = [
    {"nodeid": "t.py::test_b", "verdict": "PASS", "tokens_per_s": 12.5},
    {"nodeid": "t.py::test_a", "verdict": "INVALID", "invalid": ["interrupted (SIGINT)"]},
]


def start(tmp_path: Path) -> journal.Journal:
    doc = report.document([], BUILTIN["sim"], "--tokperf-profile")
    return journal.Journal(journal.path_for(tmp_path / "out.json"), doc)


def test_a_finished_session_recovers_to_the_document_it_wrote(tmp_path: Path) -> None:
    j = start(tmp_path)
    for p in PAYLOADS:
        j.append(p)
    j.close(exitstatus=1)
    assert j.path == tmp_path / "out.json.journal"
    written = report.document(PAYLOADS, BUILTIN["sim"], "--tokperf-profile")
    out, doc = journal.recover(j.path)
    assert out == tmp_path / "out.json"
    assert json.loads(out.read_text()) == doc
    assert set(doc) == set(written) | {"recovered"}
    assert doc["tests"] == sorted(PAYLOADS, key=lambda p: p["nodeid"])
    assert doc["summary"] == {**dict.fromkeys(report.VERDICTS, 0), "PASS": 1, "INVALID": 1}
    assert doc["profile"] == written["profile"] and doc["machine"] == written["machine"]
    assert doc["recovered"]["session_finished"] is True
    assert doc["recovered"]["last_line_torn"] is False


def test_each_line_is_on_disk_when_append_returns(tmp_path: Path) -> None:
    j = start(tmp_path)
    j.append(PAYLOADS[0])
    # read back by another open file while the journal is still open: nothing buffered
    got = journal.read(j.path)
    assert got.payloads == (PAYLOADS[0],) and not got.finished
    j.close()


def test_a_line_cut_by_a_crash_loses_that_test_only(tmp_path: Path) -> None:
    j = start(tmp_path)
    j.append(PAYLOADS[0])
    j.close()
    with j.path.open("a") as f:
        f.write(json.dumps({"kind": "test", "payload": PAYLOADS[1]})[:25])  # no newline
    got = journal.read(j.path)
    assert got.payloads == (PAYLOADS[0],) and got.torn and not got.finished


def test_a_corrupt_line_in_the_middle_names_file_and_line(tmp_path: Path) -> None:
    j = start(tmp_path)
    j.append(PAYLOADS[0])
    j.close()
    lines = j.path.read_text().splitlines()
    j.path.write_text("\n".join([lines[0], "{oops", lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"out\.json\.journal:2: not a journal line"):
        journal.read(j.path)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty journal"),
        ('{"kind": "test", "payload": {}}\n', "not a pytest-tokperf journal"),
        ('{"kind": "header", "schema": "other/1"}\n', "not a pytest-tokperf journal"),
        (f'{{"kind": "header", "schema": "{report.SCHEMA}"}}\n', "not a pytest-tokperf journal"),
    ],
)
def test_not_a_journal(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "x.journal"
    path.write_text(text)
    with pytest.raises(ValueError, match=why):
        journal.read(path)


def test_recover_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    j = start(tmp_path)
    j.append(PAYLOADS[0])  # no close: the session was killed
    assert main(["recover", str(j.path), "--out", str(tmp_path / "r.json")]) == 0
    assert "recovered 1 test results" in capsys.readouterr().out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["tests"] == [PAYLOADS[0]] and doc["recovered"]["session_finished"] is False
    assert main(["recover", str(tmp_path / "missing.journal")]) == 1
    assert "missing.journal: cannot read the journal" in capsys.readouterr().err


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    out.write_text("old\n")
    tmp = tmp_path / f".out.json.{os.getpid()}.tmp"
    tmp.symlink_to("/dev/full")  # every write there fails: ENOSPC, a full disk
    with pytest.raises(OSError, match="No space left on device"):
        report.write_json(out, {"tests": []})
    assert out.read_text() == "old\n" and not tmp.exists() and not tmp.is_symlink()
