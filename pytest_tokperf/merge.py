"""Rack results from nodes that ran apart, and metrics recomputed from records files.

`merge`: each node's JSON results (written with `--tokperf-json` and
`--tokperf-records`) name the node and its records file; the node's timeline is
rebuilt from the records of the run its payload describes (the test's last run), and
the rack is judged exactly as rank 0 judges a live MPI run (`rackjudge.judge`),
except that clock offsets are unknown: the windows come from each node's own wall
clock. `recompute`: every metric of every run, from the records alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_tokperf import metrics, rackjudge, records, report
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.rackjudge import Node


class MergeError(Exception):
    """An input that cannot be merged; the message names the file."""


def _node_name(doc: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The records' node name of a payload row: host/rankN under MPI, else the host."""
    if "node" in row:
        return f"{row['node']['host']}/rank{row['node']['rank']}"
    meta = doc.get("node") or {}
    return str(meta.get("name") or doc["machine"]["hostname"])


def _perf_rows(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        row
        for row in doc["tests"]
        if row.get("kind") not in ("rack", report.PARITY_KIND) and row["verdict"] != "SKIPPED"
    ]


def _fabric(doc: Mapping[str, Any]) -> tuple[tuple[str | None, int | None, int | None], ...]:
    gpus = (doc.get("inventory") or {}).get("gpus") or []
    return tuple((g.get("fabric_cluster"), g.get("fabric_clique"), g.get("fabric_state"))
                 for g in gpus)  # fmt: skip


def _last_runs(path: Path) -> dict[tuple[str, str], tuple[list[Any], int | None]]:
    """(test, node) -> the records and window end of that test's last run on that node."""
    out: dict[tuple[str, str], tuple[int, list[Any], int | None]] = {}
    for (test, run, node), (recs, end) in records.runs(records.read_rows(path)).items():
        if (test, node) not in out or run > out[(test, node)][0]:
            out[(test, node)] = (run, recs, end)
    return {key: (recs, end) for key, (_, recs, end) in out.items()}


def _identity(path: Path, doc: Mapping[str, Any]) -> tuple[Any, ...]:
    """Which run wrote a results file: host, pid and start (the file itself for a file
    written before results named their run)."""
    run = doc.get("run")
    if not run:
        return ("file", str(path.resolve()))
    rank = (doc.get("node") or {}).get("rank")
    return (run.get("host"), run.get("pid"), run.get("started"), rank)


def load_nodes(paths: Sequence[Path]) -> dict[str, list[Node]]:
    """Per test: one Node per input file (its position in the list is its rank here).

    A rack is at least two nodes, each from its own run: two files of one run (one
    node counted twice) are refused.
    """
    if len(paths) < 2:
        raise MergeError(
            f"a rack needs at least 2 nodes; got {len(paths)} ({', '.join(map(str, paths))})"
        )
    by_test: dict[str, list[Node]] = {}
    seen: dict[tuple[Any, ...], Path] = {}
    for rank, path in enumerate(paths):
        doc = json.loads(path.read_text(encoding="utf-8"))
        ident = _identity(path, doc)
        if ident in seen:
            raise MergeError(
                f"{seen[ident]} and {path} are the same run ({_said(ident)}): each node's "
                "results must come from its own run"
            )
        seen[ident] = path
        source = doc.get("records")
        if not source:
            raise MergeError(f"{path}: names no records file: run the node with --tokperf-records")
        runs = _last_runs(Path(source))
        host = str((doc.get("node") or {}).get("host") or doc["machine"]["hostname"])
        for row in _perf_rows(doc):
            test = str(row.get("test") or row["nodeid"])
            found = runs.get((test, _node_name(doc, row)))
            if found is None:
                raise MergeError(f"{path}: {source} has no records of {test}")
            recs, end = found
            timeline = rackjudge.timeline(recs, None, end)
            nodes = int((doc.get("profile") or {}).get("nodes") or 1)  # the rack it was made for
            row = {**row, "rack_nodes": row.get("rack_nodes") or (nodes if nodes > 1 else None)}
            by_test.setdefault(test, []).append(Node(rank, host, row, timeline, 0, _fabric(doc)))
    return by_test


def _said(ident: tuple[Any, ...]) -> str:
    if ident[0] == "file":
        return f"one file, {ident[1]}"
    host, pid, started, rank = ident
    return f"host {host}, pid {pid}, started {started}" + ("" if rank is None else f", rank {rank}")


def merge(paths: Sequence[Path], floor: float | None = None) -> list[dict[str, Any]]:
    """Per test the nodes ran: a row per node, then the rack row (the floor: given, else
    the nodes' own, the marker's per_rack or the profile's rack_floor)."""
    rows = []
    for test, nodes in sorted(load_nodes(paths).items()):
        first = nodes[0].payload
        rows += [rackjudge.node_row(test, n.payload, n.rank, n.host) for n in nodes]
        rows.append(
            rackjudge.judge(
                test,
                nodes,
                floor=floor if floor is not None else first.get("rack_floor"),
                confidence=float(first.get("confidence", 0.95)),
                missing=[],
                expected_nodes=first.get("rack_nodes"),
            )
        )
    return rows


def recompute(path: Path, doc: Mapping[str, Any] | None = None) -> tuple[list[list[str]], bool]:
    """A table of every run's metrics from the records (and the JSON's, where given),
    and whether every last run matches its JSON payload."""
    payloads = {}
    for row in _perf_rows(doc) if doc else []:
        payloads[(str(row.get("test") or row["nodeid"]), _node_name(doc or {}, row))] = row
    grouped = records.runs(records.read_rows(path))
    last: dict[tuple[str, str], int] = {}
    for test, run, node in grouped:
        last[(test, node)] = max(run, last.get((test, node), run))
    table = [["test", "node", "run", "requests", "failed", "tokens/s", "TTFT p99 ms",
              "JSON tokens/s", "match"]]  # fmt: skip
    ok = True
    for (test, run, node), (recs, end) in sorted(grouped.items()):
        payload = payloads.get((test, node)) if run == last[(test, node)] else None
        devices = int((payload or {}).get("engine", {}).get("devices", 1))
        info = EngineInfo("records", "-", "-", devices)
        result = metrics.summarize(recs, info, scenario="-", workload="-", max_tokens=None,
                                   window_end_ns=end)  # fmt: skip
        match = "-"
        if payload is not None:
            same = (
                result.requests == payload["requests"]
                and result.output_tokens == payload["output_tokens"]
                and abs(result.tokens_per_s - payload["tokens_per_s"])
                <= 1e-9 * max(1.0, payload["tokens_per_s"])
                and _close(result.ttft.p99, payload["ttft_s"]["p99"])
            )
            ok = ok and same
            match = "yes" if same else "NO"
        p99 = result.ttft.p99
        ttft = "-" if p99 is None else f"{p99 * 1000:.3f}"
        json_rate = "-" if payload is None else report.num(payload["tokens_per_s"])
        table.append([test, node, str(run), str(result.requests), str(result.failed),
                      report.num(result.tokens_per_s), ttft, json_rate, match])  # fmt: skip
    return table, ok


def _close(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and abs(a - b) <= 1e-9)


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
