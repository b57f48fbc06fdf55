"""Baseline comparison in words: failure lines, the terminal section, the GitHub summary.

Reads only payloads (plain JSON data), like `report`; kept apart from it so the
comparison's formatting lives in one place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_tokperf.report import ms, num
from pytest_tokperf.verdict import SLO_METRICS

ENV_STEP_SUMMARY = "GITHUB_STEP_SUMMARY"


def metric_name(metric: str) -> str:
    if metric == "tokens_per_s":
        return "output tokens/s"
    what, pct = metric.split("_")
    return f"{SLO_METRICS[what]} {pct}"


def _value(metric: str, value: float) -> str:
    return num(value) if metric == "tokens_per_s" else ms(value)


def _pct(ratio: float | None) -> str:
    return "?" if ratio is None else f"{(ratio - 1) * 100:+.1f}%"


def context(block: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    """[baseline 2026-11-30, commit abc1234, same profile cpu on Intel Xeon x2]"""
    prov = block["baseline"]["provenance"]
    commit = (prov.get("commit") or "unknown")[:7]
    date = (prov.get("date") or "unknown date")[:10]
    return (
        f"[baseline {date}, commit {commit}, same profile {payload['profile']} on "
        f"{block['baseline']['key']['hardware']}]"
    )


def check_line(check: Mapping[str, Any], confidence: float) -> str:
    """output tokens/s 150 vs baseline 200 (-25.0%, 95% CI -28.1%..-21.9%) exceeds ..."""
    metric = check["metric"]
    up = metric != "tokens_per_s"  # a latency regresses upwards
    ci = (
        f", {confidence:.0%} CI {_pct(check['low'])}..{_pct(check['high'])}"
        if check["low"] is not None
        else f", no interval: {check['note'] or 'too few samples'}"
    )
    head = (
        f"{metric_name(metric)} {_value(metric, check['observed'])} vs baseline "
        f"{_value(metric, check['baseline'])} ({_pct(check['ratio'])}{ci})"
    )
    allowed = f"the allowed {check['tolerance']:.0%} {'rise' if up else 'drop'}"
    status = check["status"]
    if status == "IMPROVED":
        better = f"better by more than {check['tolerance']:.0%}"
        return f"IMPROVED: {head} is {better}: a baseline worth updating"
    if status == "INCONCLUSIVE":
        return f"INCONCLUSIVE: {head} straddles {allowed}; {_undecided(check)}"
    if status == "ACKNOWLEDGED":
        return f"ACKNOWLEDGED: {head} exceeds {allowed}, {check['note']}"
    line = f"{head} exceeds {allowed}"
    return f"{line} ({check['note']})" if check.get("note") else line


def _undecided(check: Mapping[str, Any]) -> str:
    """What to do about a comparison that straddles its tolerance. An interval narrower
    than the tolerance band is decided by the change's size, not by too little data: a
    longer run would move it to one side, and an unchanged engine that shows such a
    change moved with its machine between the runs."""
    low, high = check["low"], check["high"]
    if low is None or high is None or high - low >= check["tolerance"]:
        return "a longer run narrows the interval"
    return (
        "the change itself is near the tolerance (the interval is narrower than it): if "
        "the engine is unchanged, the machine's speed moved between the runs; "
        "`python -m pytest_tokperf calibrate` measures that drift and proposes a "
        "tolerance above it (--tokperf-max-regression)"
    )


def regression_lines(payload: Mapping[str, Any]) -> list[str]:
    """One line per check that is not a plain PASS, each with the baseline's context."""
    block = payload.get("regression")
    if not block:
        return []
    if not block["compared"]:
        return [f"not compared with a baseline: {block['reason']}"]
    ctx = context(block, payload)
    return [
        f"{check_line(c, block['confidence'])} {ctx}"
        for c in block["checks"]
        if c["status"] != "PASS"
    ]


def terminal_lines(payloads: Sequence[Mapping[str, Any]]) -> list[str]:
    """The baseline section under the tokperf table: what was compared and how it went."""
    blocks = [(p, p["regression"]) for p in payloads if p.get("regression")]
    saved = [p for p in payloads if p.get("baseline_saved")]
    lines = []
    if saved:
        folder = Path(saved[0]["baseline_saved"]).parent
        lines.append(f"baselines saved: {len(saved)} in {folder}")
    if not blocks:
        return lines
    compared = [(p, b) for p, b in blocks if b["compared"]]
    counts: dict[str, int] = {}
    for _, b in compared:
        counts[b["status"]] = counts.get(b["status"], 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines.append(
        f"baseline comparison: {len(compared)} compared ({tally or 'none'}), "
        f"{len(blocks) - len(compared)} not compared"
    )
    for p, _ in blocks:
        lines += [f"  {p['nodeid']}: {line}" for line in regression_lines(p)]
    return lines


# --- GitHub Actions step summary ---------------------------------------------------------

_FIRST = {"FAIL": 0, "INVALID": 1, "INCONCLUSIVE": 2, "ACKNOWLEDGED": 3, "PASS": 4, "MEASURED": 5}


def _vs(p: Mapping[str, Any]) -> str:
    block = p.get("regression") or {}
    if not block.get("compared"):
        return "-" if not block else "not compared"
    rows = [c for c in block["checks"] if c["metric"] == "tokens_per_s"]
    if not rows:
        return str(block["status"])
    c = rows[0]
    ci = f" ({_pct(c['low'])}..{_pct(c['high'])})" if c["low"] is not None else ""
    return f"{_pct(c['ratio'])}{ci} {block['status']}"


def markdown(payloads: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of verdicts, regressions first, then the failure lines."""
    perf = [p for p in payloads if p.get("kind") is None]

    def order(p: Mapping[str, Any]) -> tuple[int, int, str]:
        regressed = (p.get("regression") or {}).get("status") == "FAIL"
        return (0 if regressed else 1, _FIRST.get(p["verdict"], 9), str(p["nodeid"]))

    rows = [
        "| test | verdict | output tokens/s | vs baseline (CI) | TTFT p99 | TPOT p99 |",
        "|---|---|---:|---|---:|---:|",
    ]
    notes = []
    for p in sorted(perf, key=order):
        if p["verdict"] == "SKIPPED":
            rows.append(f"| `{p['nodeid']}` | SKIPPED | - | - | - | - |")
            continue
        rows.append(
            f"| `{p['nodeid']}` | **{p['verdict']}** | {num(p['tokens_per_s'])} | {_vs(p)} "
            f"| {ms(p['ttft_s']['p99'])} | {ms(p['tpot_s']['p99'])} |"
        )
        notes += [f"- `{p['nodeid']}`: {line}" for line in regression_lines(p)]
    counts: dict[str, int] = {}
    for p in perf:
        counts[p["verdict"]] = counts.get(p["verdict"], 0) + 1
    head = "### tokperf: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join([head, "", *rows, "", *notes, ""])


def write_step_summary(payloads: Sequence[Mapping[str, Any]]) -> Path | None:
    """Append the table to $GITHUB_STEP_SUMMARY when it is set; returns the path."""
    target = os.environ.get(ENV_STEP_SUMMARY)
    if not target or not payloads:
        return None
    path = Path(target)
    with path.open("a", encoding="utf-8") as f:
        f.write(markdown(payloads) + "\n")
    return path
