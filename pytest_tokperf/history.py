"""A history of runs, and its change points: `--tokperf-history DIR` and
`python -m pytest_tokperf history DIR`.

The store is plain files: one JSON line per run of a test in DIR/<test>--<digest>.jsonl,
one file per baseline key (test, profile, hardware fingerprint, model, precision,
workload, scenario; `baseline.key`), so a series never mixes hardware or settings that
must not be compared. Each line carries the run (results file name, date, commit, host)
and the metrics a change point is looked for in. Results files already written
(`--tokperf-json`) are read as history too; a run found both ways counts once.

The statistics are `changepoints`'; this module only gathers, orders and formats.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_tokperf import baseline, regression, report

SCHEMA = "pytest-tokperf/history/1"
# metric -> where it is in a payload; latencies in seconds
METRICS: dict[str, tuple[str, ...]] = {
    regression.THROUGHPUT: (regression.THROUGHPUT,),
    **{f"{m}_p99": (f"{m}_s", "p99") for m in regression.LATENCIES},
}
UNITS = {regression.THROUGHPUT: "tokens/s"}
UNRECORDED = {"kind": "cpu", "model": "unrecorded hardware", "count": 0}


class HistoryError(ValueError):
    """A history or results file that cannot be read; the message names it."""


def _metric(payload: Mapping[str, Any], path: Sequence[str]) -> float | None:
    value: Any = payload
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and value == value else None


def rows(doc: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """One history row per measured perf test of a results document; `name` names the
    run (its results file's name). Invalid runs measured nothing and are left out."""
    run = doc.get("run") or {}
    out = []
    for payload in doc.get("tests", []):
        if payload.get("kind") or payload.get("verdict") == "INVALID":
            continue  # parity, rack and node rows have other metrics
        if "tokens_per_s" not in payload:
            continue
        hw = payload.get("hardware") or UNRECORDED
        values = {m: _metric(payload, path) for m, path in METRICS.items()}
        out.append({
            "schema": SCHEMA,
            "key": baseline.key({**payload, "hardware": hw}),
            "run": {
                "name": name,
                "date": run.get("started") or doc.get("created") or "",
                "commit": doc.get("commit"),
                "host": run.get("host"),
                "pid": run.get("pid"),
                "id": run.get("id"),
            },
            "verdict": payload.get("verdict"),
            "metrics": {m: v for m, v in values.items() if v is not None},
        })  # fmt: skip
    return out


def path_for(directory: Path, key: Mapping[str, str]) -> Path:
    return baseline.path_for(directory, key).with_suffix(".jsonl")


def append(directory: Path, doc: Mapping[str, Any], name: str) -> int:
    """Append a results document's rows to the history in `directory`; returns how many.
    One write per line: a reader sees whole lines, or a torn last one it skips."""
    found = rows(doc, name)
    directory.mkdir(parents=True, exist_ok=True)
    for row in found:
        with path_for(directory, row["key"]).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return len(found)


def _read_store(path: Path) -> list[dict[str, Any]]:
    out = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a last line cut short by a killed writer
                continue
            raise HistoryError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if isinstance(row, dict) and row.get("schema") == SCHEMA:
            out.append(row)
    return out


def load(directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every row in `directory`: the store's *.jsonl and every results *.json file, and
    notes on the files skipped (other JSON, such as baselines). Raises HistoryError."""
    if not directory.is_dir():
        raise HistoryError(f"{directory} is not a directory (the history or results folder)")
    found: list[dict[str, Any]] = []
    notes: list[str] = []
    for path in sorted(directory.glob("*.jsonl")):
        found += _read_store(path)
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HistoryError(f"{path}: cannot read it as JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("schema") != report.SCHEMA:
            notes.append(f"{path.name}: not a tokperf results file, skipped")
            continue
        found += rows(doc, path.name)
    unique: dict[Any, dict[str, Any]] = {}
    for row in found:  # a run appended to the store and also kept as its results file
        run = row["run"]
        who = run.get("id") or (run.get("host"), run.get("pid"), run["date"], run["name"])
        unique.setdefault((who, json.dumps(row["key"], sort_keys=True)), row)
    return list(unique.values()), notes


def series(
    found: Iterable[Mapping[str, Any]], metric: str, since: str | None = None
) -> dict[str, list[Mapping[str, Any]]]:
    """Key (as JSON) -> the rows that have `metric`, ordered by run date then name."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in found:
        if metric not in row["metrics"] or (since and row["run"]["date"][:10] < since):
            continue
        out.setdefault(json.dumps(row["key"], sort_keys=True), []).append(row)
    for runs in out.values():
        runs.sort(key=lambda r: (r["run"]["date"], r["run"]["name"]))
    return dict(sorted(out.items()))


def worse_by(change: Any, metric: str) -> float:
    """How much worse the run after a change is, as a fraction (negative: better)."""
    ratio = float(change.ratio)
    return 1 - ratio if regression.higher_is_better(metric) else ratio - 1


def regressed(found: Sequence[Any], metric: str, tolerance: float) -> bool:
    """The nightly gate: the newest change point is worse by more than `tolerance`."""
    return bool(found) and worse_by(found[-1], metric) > tolerance


def trends(
    directory: Path, payloads: Sequence[Mapping[str, Any]], run_id: str, metric: str
) -> dict[str, dict[str, Any]]:
    """Node id -> its series in the history (this run's included, marked) with its
    change points, for the HTML report; {} when the history cannot be read."""
    from pytest_tokperf import changepoints

    try:
        found, _ = load(directory)
    except HistoryError:
        return {}
    by_key = series(found, metric)
    out: dict[str, dict[str, Any]] = {}
    for p in payloads:
        if p.get("kind") or "hardware" not in p:
            continue
        runs = by_key.get(json.dumps(baseline.key(p), sort_keys=True), [])
        if not runs:
            continue
        values = [float(r["metrics"][metric]) for r in runs]
        try:
            points = [c.index for c in changepoints.changes(values)]
            note = ""
        except ModuleNotFoundError as exc:
            points, note = [], str(exc)
        out[p["nodeid"]] = {
            "metric": metric,
            "names": [r["run"]["name"] for r in runs],
            "values": values,
            "changes": points,
            "current": [i for i, r in enumerate(runs) if r["run"].get("id") == run_id],
            "note": note,
        }
    return out


def _value(metric: str, v: float) -> str:
    return f"{v:,.1f}" if metric in UNITS else f"{v * 1000:,.1f} ms"


def describe(key: Mapping[str, str]) -> str:
    return (
        f"{key['test']} [profile {key['profile']} on {key['hardware']}, model {key['model']} "
        f"{key['precision']}, {key['workload']}, {key['scenario']}]"
    )


def _line(metric: str, c: Any, run: Mapping[str, Any], confidence: float) -> str:
    b, a = c.before, c.after

    def part(s: Any) -> str:
        return (
            f"{_value(metric, s.mean)} ({confidence:.0%} CI {_value(metric, s.low)}.."
            f"{_value(metric, s.high)}, {s.stop - s.start} runs)"
        )

    return (
        f"    {run['name']} ({run['date']}, commit {run.get('commit') or 'unknown'}): "
        f"{part(b)} -> {part(a)}, {c.ratio - 1:+.1%}, p {c.p_value:.2g}"
    )


def main(args: argparse.Namespace) -> int:
    """Print each series' change points; 1 when a newest change regressed beyond the
    tolerance, 2 on bad input."""
    from pytest_tokperf import changepoints

    if args.metric and args.metric not in METRICS:
        print(f"history: unknown --metric {args.metric!r}; one of {', '.join(METRICS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.since and not re.fullmatch(r"\d{4}-\d\d-\d\d", args.since):
        print(f"history: --since {args.since!r} is not a date; write YYYY-MM-DD", file=sys.stderr)
        return 2
    try:
        found, notes = load(Path(args.directory))
    except HistoryError as exc:
        print(f"history: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"history: {note}", file=sys.stderr)
    by_key: dict[str, list[tuple[str, list[Mapping[str, Any]]]]] = {}
    for metric in [args.metric] if args.metric else list(METRICS):
        for key, runs in series(found, metric, args.since).items():
            by_key.setdefault(key, []).append((metric, runs))
    if not by_key:
        since = f" since {args.since}" if args.since else ""
        print(f"history: no runs in {args.directory}{since}", file=sys.stderr)
        return 2
    failed = False
    for key, metrics in sorted(by_key.items()):
        print(describe(json.loads(key)))
        for metric, runs in metrics:
            values = [float(r["metrics"][metric]) for r in runs]
            try:
                points = changepoints.changes(values, args.alpha, args.confidence)
            except ModuleNotFoundError as exc:
                print(f"history: {exc}", file=sys.stderr)
                return 2
            bad = regressed(points, metric, args.tolerance)
            failed |= bad
            plural = "s" * (len(points) != 1)
            print(f"  {metric}: {len(runs)} runs, {len(points)} change point{plural}")
            for c in points:
                print(_line(metric, c, runs[c.index]["run"], args.confidence))
            if bad:
                print(f"    REGRESSION: the newest change is worse by more than "
                      f"{args.tolerance:.0%}")  # fmt: skip
    return 1 if failed else 0


def add_parser(commands: Any) -> None:
    """The `history` subcommand's arguments."""
    from pytest_tokperf import changepoints

    his = commands.add_parser(
        "history", help="change points over many runs (a --tokperf-history folder or results)"
    )
    his.add_argument("directory", help="a --tokperf-history folder, or one of results files")
    his.add_argument("--metric", default=None, help=f"one of {', '.join(METRICS)} (default: all)")
    his.add_argument("--since", default=None, help="only runs on or after DATE (YYYY-MM-DD)")
    his.add_argument(
        "--tolerance",
        type=float,
        default=regression.DEFAULT_TOLERANCE,
        help="a newest change worse by more than this fails (default 0.05)",
    )
    his.add_argument(
        "--alpha",
        type=float,
        default=changepoints.ALPHA,
        help="max p-value of a change point (default 0.001)",
    )
    his.add_argument("--confidence", type=float, default=0.95, help="of the intervals")
