"""The results of a session: every test's payload, collected where tests report
(the xdist controller, MPI rank 0, or the only process), and every output fed from
them: the journal (as each test is judged), the JSON document, the GitHub step
summary, the HTML report and the terminal summary; and the live progress line of a
long run, which is terminal output too.

Payloads are plain JSON data in `user_properties`, so results never need to know
whether a test ran here, in an xdist worker or on another MPI rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_tokperf import columns, journal, metrics, rack, rackjudge, records, report, summary
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.hardware.inventory import Inventory
from pytest_tokperf.runner import Progress
from pytest_tokperf.settings import Settings

PROPERTY = report.PROPERTY
PROGRESS_AFTER_S = 3.0  # runs shorter than this print no progress line
PROGRESS_EVERY_S = 5.0


class Results:
    """Registered as the plugin "tokperf-results"; the only object that writes results."""

    def __init__(
        self,
        config: pytest.Config,
        s: Settings,
        inventory: Inventory,
        world: rack.Local | rack.Rack,
        records_writer: records.Writer | None,
    ) -> None:
        self.config = config
        self.profile = s.profile
        self.profile_source = s.profile_source
        self.confidence = s.confidence
        self.inventory = inventory
        self.rack = world
        self.records = records_writer
        self.json_path = s.json_path
        self.html_path = s.html_path
        self.history = s.history
        # the summary table whole (wide, or -v) or in at most columns.WIDTH characters a line
        self.table_width = (
            None if s.table == "wide" or config.get_verbosity() >= 1 else columns.WIDTH
        )
        self.history_rows: int | None = None  # appended to the history, once written
        self._commit: str | None = None
        # xdist's documented marker of a worker process: workers report, never write
        self.is_worker = hasattr(config, "workerinput")
        self.payloads: list[dict[str, Any]] = []
        self.journal: journal.Journal | None = None
        self.write_errors: list[str] = []  # results files that could not be written, and why
        self.json_written = False
        # which run wrote a results file: `merge` refuses to count one run twice, and
        # `history` counts a run once (its id: runs in one process share host and pid)
        self.run = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "id": uuid.uuid4().hex}  # fmt: skip

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.json_path is None or self.is_worker:
            return
        path = journal.path_for(self.json_path)
        try:
            self.journal = journal.Journal(path, self._document())
        except OSError as exc:
            self._write_failed(path, exc, "the results stay in memory until the end")

    def _write_failed(self, path: Path, exc: OSError, consequence: str, now: bool = True) -> None:
        """Say so in the summary (and `now`, where the session goes on without it)."""
        line = f"tokperf: cannot write {path}: {exc.strerror or exc}; {consequence}"
        self.write_errors.append(line)
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if now and terminal is not None:
            terminal.write_line(line, red=True)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when not in ("setup", "call"):
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                self.payloads.append(json.loads(str(value)))
                if self.journal is not None:  # on disk before the next test is judged
                    try:
                        self.journal.append(self.payloads[-1])
                    except OSError as exc:
                        self._write_failed(self.journal.path, exc, "journal stopped")
                        self.journal = None

    def _document(self) -> dict[str, Any]:
        return report.document(
            self._sorted(), self.profile, self.profile_source, inventory=self.inventory
        )

    @pytest.hookimpl(tryfirst=True)  # before any cleanup that might fail or be interrupted
    def pytest_sessionfinish(self, exitstatus: int) -> None:
        if self.journal is not None:
            with contextlib.suppress(OSError):  # the journal has every test already
                self.journal.close(exitstatus)
        if self.json_path is not None and not self.is_worker:
            try:
                self._write_json(self.json_path)
                self.json_written = True
            except OSError as exc:
                kept = self.journal.path if self.journal else "the terminal summary below"
                self._write_failed(self.json_path, exc, f"the results are in {kept}", now=False)
        if self.history is not None and not self.is_worker and self.rack.rank == 0:
            self._append_history(self.history)
        if not self.is_worker:
            summary.write_step_summary(self._sorted())
            if self.html_path is not None:
                from pytest_tokperf import html

                trends = None
                if self.history is not None:
                    from pytest_tokperf import history

                    trends = history.trends(
                        self.history, self._sorted(), str(self.run["id"]), "tokens_per_s"
                    )
                html.write(self.html_path, self._sorted(), self.profile.name, trends)

    def commit(self) -> str | None:
        """The commit under test (GITHUB_SHA, else the rootdir's git HEAD), asked once."""
        if self._commit is None:
            from pytest_tokperf.baseline import git_commit

            self._commit = git_commit(self.config.rootpath) or ""
        return self._commit or None

    def _append_history(self, directory: Path) -> None:
        from pytest_tokperf import history

        doc = {**self._document(), "run": self.run, "commit": self.commit()}
        name = self.json_path.name if self.json_path is not None else f"run {self.run['started']}"
        try:
            self.history_rows = history.append(directory, doc, name)
        except OSError as exc:
            self._write_failed(directory, exc, "this run is not in the history", now=False)

    def _write_json(self, path: Path) -> None:
        """Rank 0 (or the only process) writes PATH; under MPI each rank also writes its
        own node's rows to PATH.rankN, the files `merge` takes."""
        rank, rows = self.rack.rank, self._sorted()
        where = {
            "node": {"name": self.rack.node, "rank": rank, "host": self.rack.host},
            "records": None if self.records is None else str(self.records.path.resolve()),
            "run": self.run,
            "commit": self.commit(),
        }
        docs = [(path, rows)] if rank == 0 else []
        if self.rack.size > 1:
            own = [r for r in rows if r.get("kind") != "rack" and r.get("node", {}).get("rank",
                   rank) == rank]  # fmt: skip
            docs.append((path.with_name(f"{path.stem}.rank{rank}{path.suffix}"), own))
        for target, payloads in docs:
            doc = report.document(
                payloads, self.profile, self.profile_source, inventory=self.inventory
            )
            report.write_json(target, {**doc, **where})

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.is_worker or not (self.payloads or self.write_errors):
            return
        terminalreporter.section("tokperf")
        perf = [p for p in self._sorted() if p.get("kind") != report.PARITY_KIND]
        parity = [p for p in self._sorted() if p.get("kind") == report.PARITY_KIND] + [
            {**p["parity"], "verdict": p["verdict"]} for p in perf if p.get("parity")
        ]  # a perf test that also scored parity: its parity in the parity table too
        for line in report.table(perf, self.table_width) if perf else []:
            terminalreporter.write_line(line)
        for line in report.parity_table(parity) if parity else []:
            terminalreporter.write_line(line)
        racks = [p for p in self._sorted() if p.get("kind") == "rack" and p["rack"]["nodes"]]
        for line in rackjudge.table(racks) if racks else []:
            terminalreporter.write_line(line)
        for line in summary.terminal_lines(perf):
            terminalreporter.write_line(line)
        if self.html_path is not None:
            terminalreporter.write_line(f"HTML report: {self.html_path}")
        for line in self.write_errors:
            terminalreporter.write_line(line, red=True)
        if self.json_written:
            terminalreporter.write_line(f"results: {self.json_path}")
        if self.history_rows is not None:
            terminalreporter.write_line(f"history: {self.history_rows} appended to {self.history}")

    def _sorted(self) -> list[dict[str, Any]]:
        return sorted(self.payloads, key=lambda p: str(p["nodeid"]))

    def progress(self) -> Progress | None:
        """The live line's callback, or None where it must stay quiet."""
        if self.is_worker or self.config.get_verbosity() < 0:
            return None
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if terminal is None:
            return None
        shown = [-PROGRESS_EVERY_S]  # when the last line was shown
        confidence = self.confidence

        def show(snapshot: Sequence[RequestRecord], elapsed_s: float) -> None:
            if elapsed_s < PROGRESS_AFTER_S or elapsed_s - shown[0] < PROGRESS_EVERY_S:
                return
            shown[0] = elapsed_s
            # requests in flight end "now" in a snapshot, the latest end of all
            now = max((r.end_ns for r in snapshot), default=0)
            done = sum(1 for r in snapshot if r.end_ns < now)
            line = report.progress_line(
                elapsed_s,
                done,
                len(snapshot),
                metrics.output_tokens_per_s(snapshot),
                metrics.throughput_interval(snapshot, confidence),
            )
            # like pytest's live logging: write past the capture to the real terminal
            if capture is not None:
                with capture.global_and_fixture_disabled():
                    terminal.write_line(line)
            else:
                terminal.write_line(line)

        return show
