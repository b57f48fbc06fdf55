"""The rack verdict from the nodes' results (pure: no MPI, no I/O).

A rack rate follows the published GB300 NVL72 number (Azure ND GB300 v6: 18 nodes
run together and summed), made checkable: it is the sum of the nodes' output tokens
inside the window in which every node was running (latest start to earliest finish),
divided by that window. Each node contributes a `Timeline` (its tokens by arrival
time in equal bins on the wall clock), small enough to send to rank 0 whatever the
run's size, and the same thing `merge` rebuilds from the records files. The interval
comes from batch means again: the common window split into `metrics.BATCHES` batches,
each batch's rate summed over the nodes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_tokperf import metrics, verdict
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.records import Anchor
from pytest_tokperf.report import num
from pytest_tokperf.verdict import floor_status

BINS = 4096  # tokens lost to prorating at the window's edges: under 1/4096 of a run each
OVERLAP_MIN = 0.95  # the common window must cover 95% of the longest node's run
CLOCK_OFFSET_MAX_MS = 5.0  # larger offsets between nodes' clocks are reported
FABRIC_COMPLETED = 3


@dataclass(frozen=True)
class Timeline:
    """Output tokens of completed requests by chunk arrival, in equal wall-clock bins."""

    start_ns: int  # first issue
    end_ns: int  # last completion, or when a run bounded by time stopped issuing
    tokens: tuple[int, ...]

    def shifted(self, offset_ns: int) -> Timeline:
        return Timeline(self.start_ns - offset_ns, self.end_ns - offset_ns, self.tokens)

    def between(self, a: int, b: int) -> float:
        """Tokens that arrived in [a, b), partial bins counted pro rata."""
        span = self.end_ns - self.start_ns
        if span <= 0 or b <= a or not self.tokens:
            return 0.0
        width = span / len(self.tokens)
        total = 0.0
        for i, n in enumerate(self.tokens):
            lo = self.start_ns + i * width
            overlap = min(b, lo + width) - max(a, lo)
            if overlap > 0:
                total += n * overlap / width
        return total

    def to_json(self) -> dict[str, Any]:
        return {"start_ns": self.start_ns, "end_ns": self.end_ns, "tokens": list(self.tokens)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Timeline:
        return cls(int(data["start_ns"]), int(data["end_ns"]), tuple(data["tokens"]))


def timeline(
    records: Sequence[RequestRecord],
    anchor: Anchor | None = None,
    end_ns: int | None = None,
    bins: int = BINS,
) -> Timeline:
    """A run's timeline on the wall clock (`anchor` None: the records already are)."""
    shift = 0 if anchor is None else anchor.wall_ns - anchor.perf_ns
    if not records:
        return Timeline(shift, shift, ())
    start = min(r.issue_ns for r in records)
    end = max(r.end_ns for r in records) if end_ns is None else end_ns
    tokens = [0] * bins
    span = max(1, end - start)
    for r in records:
        if not r.ok:
            continue
        for at, n in zip(r.chunk_ns, r.chunk_tokens, strict=True):
            if at > end:
                break
            tokens[min(max(0, (at - start) * bins // span), bins - 1)] += n
    return Timeline(start + shift, end + shift, tuple(tokens))


@dataclass(frozen=True)
class Node:
    """One node's part in a rack result."""

    rank: int
    host: str
    payload: Mapping[str, Any]  # the node's own per-test payload (report.payload)
    timeline: Timeline
    offset_ns: int = 0  # its clock minus rank 0's, measured at the barrier (0: unknown)
    fabric: tuple[tuple[str | None, int | None, int | None], ...] = ()  # per GPU

    @property
    def label(self) -> str:
        return f"rank {self.rank} ({self.host})"

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "host": self.host,
            "payload": dict(self.payload),
            "timeline": self.timeline.to_json(),
            "offset_ns": self.offset_ns,
            "fabric": [list(f) for f in self.fabric],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Node:
        return cls(
            rank=int(data["rank"]),
            host=str(data["host"]),
            payload=data["payload"],
            timeline=Timeline.from_json(data["timeline"]),
            offset_ns=int(data.get("offset_ns", 0)),
            fabric=tuple((f[0], f[1], f[2]) for f in data.get("fabric", ())),
        )


def identity(nodes: Sequence[Node]) -> list[str]:
    """Why these nodes are not one NVLink domain (empty: they are, or none has a fabric).

    The rack's domain is the (clusterUuid, cliqueId) most nodes share; every other
    node is named.
    """
    if not any(f[0] is not None for n in nodes for f in n.fabric):
        return []  # no node reports an NVLink fabric: not a rack-scale NVLink system
    domains: dict[int, set[tuple[str | None, int | None]]] = {}
    problems = []
    for n in nodes:
        done = {(c, q) for c, q, s in n.fabric if s == FABRIC_COMPLETED}
        if not n.fabric or any(c is None or s != FABRIC_COMPLETED for c, _, s in n.fabric):
            problems.append(
                f"{n.label} has GPUs without a completed NVLink fabric registration "
                "(NVML fabric state is not 3, or no fabric info)"
            )
        domains[n.rank] = done
    single = Counter(next(iter(d)) for d in domains.values() if len(d) == 1)
    if not single:
        return [*problems, "no node's GPUs are all in one NVLink domain"]
    rack, _ = single.most_common(1)[0]
    for n in nodes:
        found = domains[n.rank]
        if found and found != {rack}:
            where = ", ".join(f"cluster {c} clique {q}" for c, q in sorted(found, key=str))
            problems.append(
                f"{n.label} is in another NVLink domain ({where}) than the rack "
                f"(cluster {rack[0]} clique {rack[1]})"
            )
    return problems


def common_window(nodes: Sequence[Node]) -> tuple[int, int, float]:
    """(latest start, earliest finish, that window / the longest node run)."""
    lines = [n.timeline.shifted(n.offset_ns) for n in nodes]
    start = max(t.start_ns for t in lines)
    end = min(t.end_ns for t in lines)
    longest = max(t.end_ns - t.start_ns for t in lines)
    return start, end, (max(0, end - start) / longest if longest > 0 else 0.0)


def rack_rate(
    nodes: Sequence[Node], confidence: float, batches: int = metrics.BATCHES
) -> tuple[float, metrics.Interval | None, list[float]]:
    """Summed output tokens/s over the common window, its interval, and each node's tokens."""
    start, end, _ = common_window(nodes)
    lines = [n.timeline.shifted(n.offset_ns) for n in nodes]
    if end <= start:
        return 0.0, None, [0.0 for _ in nodes]
    inside = [t.between(start, end) for t in lines]
    rate = sum(inside) * metrics.NS / (end - start)
    edges = [start + (end - start) * k // batches for k in range(batches + 1)]
    rates = [
        sum(t.between(a, b) for t in lines) * metrics.NS / (b - a)
        for a, b in itertools.pairwise(edges)
        if b > a
    ]
    return rate, metrics.batch_means(rates, confidence), inside


def _same(nodes: Sequence[Node]) -> list[str]:
    """Nodes that ran something else than rank 0's profile, engine, model or workload."""

    def what(p: Mapping[str, Any]) -> tuple[Any, ...]:
        e = p.get("engine") or {}
        return (
            p.get("profile"),
            e.get("backend"),
            e.get("model"),
            e.get("precision"),
            p.get("scenario"),
            p.get("workload"),
            p.get("max_tokens"),
        )

    first = what(nodes[0].payload)
    return [
        f"{n.label} ran profile/engine/model/precision/scenario/workload/max_tokens "
        f"{what(n.payload)}, {nodes[0].label} {first}"
        for n in nodes[1:]
        if what(n.payload) != first
    ]


def judge(
    nodeid: str,
    nodes: Sequence[Node],
    *,
    floor: float | None,
    confidence: float = 0.95,
    missing: Sequence[str] = (),
    expected_nodes: int | None = None,
) -> dict[str, Any]:
    """The rack row: every node's verdict and the rack as one system, as checks of one
    judgment (`verdict.decide`).

    FAIL when a node is missing or failed; else INVALID when the nodes are not one
    measurement (different runs, different NVLink domains, too little overlap, not
    the profile's node count); else the rack floor's PASS/FAIL/INCONCLUSIVE with the
    nodes' own verdicts.
    """
    checks = [
        verdict.check("node", "FAIL", "node", f"{m} sent no result (it died, hung or was "
                      "never started)") for m in missing
    ]  # fmt: skip
    for n in nodes:
        status = str(n.payload.get("verdict"))
        if status == "FAIL":
            why = f"{n.label} failed its own checks: {node_failure(n.payload)}"
            checks.append(verdict.check("node", "FAIL", "node", why))
        elif status == "INVALID":
            why = f"{n.label}: {'; '.join(n.payload.get('invalid') or ['invalid'])}"
            checks.append(verdict.check("node", "INVALID", "validity", why))
        elif status in ("INCONCLUSIVE", "PASS", "ACKNOWLEDGED"):
            why = f"{n.label}: {status}" + (
                f" ({node_undecided(n.payload)})" if status == "INCONCLUSIVE" else ""
            )
            checks.append(verdict.check("node", status, "rack", why))
    count = len(nodes) + len(missing)
    nodes = [n for n in nodes if not n.payload.get("error")]  # ended early: no run to judge
    broken = [*(_same(nodes) if nodes else []), *identity(nodes)]
    if expected_nodes is not None and count != expected_nodes:
        broken.append(
            f"the profile's rack is {expected_nodes} nodes (its `nodes`), this rack run has {count}"
        )
    start, end, overlap = common_window(nodes) if nodes else (0, 0, 0.0)
    if nodes and overlap < OVERLAP_MIN:
        broken.append(
            f"the nodes ran together for {overlap:.1%} of the longest node's run "
            f"(at least {OVERLAP_MIN:.0%} needed): start them together"
        )
    checks += [verdict.check("rack", "INVALID", "validity", why) for why in broken]
    rate, interval, inside = rack_rate(nodes, confidence) if nodes else (0.0, None, [])
    if floor is not None:
        checks.append(
            verdict.check(
                "per_rack",
                floor_status(interval, rate, floor),
                "rack",
                observed=rate,
                limit=floor,
                ci_low=None if interval is None else interval.low,
                ci_high=None if interval is None else interval.high,
                confidence=confidence,
            )
        )
    status = verdict.decide(checks)
    offsets = {n.label: n.offset_ns / 1e6 for n in nodes}
    notes = [
        f"{label}'s clock is {ms:+.1f} ms off rank 0's (over {CLOCK_OFFSET_MAX_MS:g} ms: "
        "check NTP/PTP); windows were corrected by it"
        for label, ms in offsets.items()
        if abs(ms) > CLOCK_OFFSET_MAX_MS
    ]
    first = nodes[0].payload if nodes else {}
    devices = sum(int((n.payload.get("engine") or {}).get("devices", 1)) for n in nodes)
    return {
        **{
            k: first.get(k)
            for k in (
                "profile",
                "device_kind",
                "scenario",
                "workload",
                "max_tokens",
                "qps",
                "concurrency",
            )
        },
        "nodeid": nodeid,
        "kind": "rack",
        "verdict": status,
        "requests": sum(int(n.payload.get("requests", 0)) for n in nodes),
        "failed": sum(int(n.payload.get("failed", 0)) for n in nodes),
        "output_tokens": sum(int(n.payload.get("output_tokens", 0)) for n in nodes),
        "duration_s": max(0, end - start) / metrics.NS,
        "tokens_per_s": rate,
        "tokens_per_s_per_gpu": rate / devices if devices else 0.0,
        "ttft_s": _worst(nodes, "ttft_s"),
        "tpot_s": _worst(nodes, "tpot_s"),
        "floors": {**dict(first.get("floors") or {}), **({"per_rack": floor} if floor else {})},
        "confidence": confidence,
        "checks": [dataclasses.asdict(c) for c in checks],
        "invalid": [c.detail for c in checks if c.status == "INVALID"],
        "failures": [c.detail for c in checks if c.kind == "node" and c.status == "FAIL"],
        "notes": notes,
        "errors": [e for n in nodes for e in n.payload.get("errors", [])][:10],
        "engine": {**dict(first.get("engine") or {}), "devices": devices},
        "rack": {
            "nodes": [
                {
                    "rank": n.rank,
                    "host": n.host,
                    "verdict": n.payload.get("verdict"),
                    "tokens_per_s": n.payload.get("tokens_per_s"),
                    "tokens_in_window": t,
                    "clock_offset_ms": n.offset_ns / 1e6,
                    "start_ns": n.timeline.start_ns,
                    "end_ns": n.timeline.end_ns,
                    "fabric": [list(f) for f in n.fabric],
                }
                for n, t in zip(nodes, inside, strict=True)
            ],
            "missing": list(missing),
            "window": {"start_ns": start, "end_ns": end, "overlap": overlap},
        },
    }


def node_row(nodeid: str, payload: Mapping[str, Any], rank: int, host: str) -> dict[str, Any]:
    """A node's own payload as a row of the rack test's results."""
    return {
        **payload,
        "nodeid": f"{nodeid} [rank {rank} ({host})]",
        "kind": "node",
        "test": nodeid,
        "node": {"rank": rank, "host": host},
    }


def _worst(nodes: Sequence[Node], key: str) -> Any:
    """The node's latency distribution with the highest p99 (None: none measured)."""
    dists = [n.payload[key] for n in nodes if (n.payload.get(key) or {}).get("p99") is not None]
    return max(dists, key=lambda d: d["p99"]) if dists else {"p99": None}


def node_failure(payload: Mapping[str, Any]) -> str:
    """A node's failed checks in one line: 'per_gpu 9.1 < 10; 2 requests failed'."""
    if payload.get("error"):
        return str(payload["error"])
    parts = [
        f"{c['metric']} {num(c['observed'])} < {num(c['limit'])}"
        if c["metric"] != "failed_requests"
        else f"{num(c['observed'])} requests failed"
        for c in payload.get("checks", [])
        if not c["passed"]
    ]
    return "; ".join(parts) or "failed"


def node_undecided(payload: Mapping[str, Any]) -> str:
    """A node's undecided checks in one line: 'per_gpu: no interval: 4 windows ...'."""
    parts = [
        f"{c['metric']}: {c.get('detail') or _straddles(c)}"
        for c in payload.get("checks", [])
        if c.get("status") == "INCONCLUSIVE"
    ]
    return "; ".join(parts) or "undecided"


def _straddles(c: Mapping[str, Any]) -> str:
    if c.get("ci_low") is None or c.get("limit") is None:
        return "undecided"
    return f"its interval {num(c['ci_low'])}-{num(c['ci_high'])} straddles {num(c['limit'])}"


def context(row: Mapping[str, Any]) -> str:
    engine = row.get("engine") or {}
    nodes = len(row["rack"]["nodes"]) + len(row["rack"]["missing"])
    return (
        f"[profile {row.get('profile')}, engine {engine.get('backend')}, model "
        f"{engine.get('model')} {engine.get('precision')}, {nodes} nodes, "
        f"{engine.get('devices')} devices, {row['requests']:,} requests]"
    )


def message(row: Mapping[str, Any]) -> str:
    """One line per reason the rack did not pass, each naming the node where it is one."""
    ctx = context(row)
    lines = [f"rack: {f} {ctx}" for f in row["failures"]]
    lines += [f"INVALID rack measurement: {r} {ctx}" for r in row["invalid"]]
    for c in row["checks"]:
        if c["metric"] != "per_rack" or c["status"] == "PASS":
            continue
        ci = (
            ""
            if c["ci_low"] is None
            else (f" ({row['confidence']:.0%} CI {num(max(0.0, c['ci_low']))}-{num(c['ci_high'])})")
        )
        observed = f"{row.get('scenario')} rack output tokens/s {num(c['observed'])}{ci}"
        if c["status"] == "INCONCLUSIVE":
            lines.append(f"INCONCLUSIVE: {observed} straddles floor {num(c['limit'])} {ctx}")
        else:
            lines.append(f"{observed} < floor {num(c['limit'])} {ctx}")
    lines += [
        f"INCONCLUSIVE: {c['detail']} {ctx}"
        for c in row["checks"]
        if c["kind"] == "rack" and c["metric"] == "node" and c["status"] == "INCONCLUSIVE"
    ]
    lines += [f"  note: {n}" for n in row["notes"]]
    return "\n".join(lines)


def table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per rack test: one line per node, then the rack; then any notes (clock offsets)."""
    out = [("test", "node", "tokens/s", "tokens in window", "clock ms", "verdict")]
    for row in rows:
        for n in row["rack"]["nodes"]:
            out.append(
                (
                    row["nodeid"],
                    f"rank {n['rank']} {n['host']}",
                    num(n["tokens_per_s"]),
                    num(n["tokens_in_window"]),
                    f"{n['clock_offset_ms']:+.2f}",
                    str(n["verdict"]),
                )
            )
        for m in row["rack"]["missing"]:
            out.append((row["nodeid"], m, "-", "-", "-", "MISSING"))
        floor = row["floors"].get("per_rack")
        out.append(
            (
                row["nodeid"],
                "rack",
                num(row["tokens_per_s"]),
                f"{row['rack']['window']['overlap']:.1%} overlap",
                f"floor {num(floor)}" if floor else "",
                row["verdict"],
            )
        )
    widths = [max(len(r[i]) for r in out) for i in range(len(out[0]))]
    notes = [f"{row['nodeid']}: note: {n}" for row in rows for n in row.get("notes", [])]
    return [
        "  ".join(
            c.rjust(w) if i in (2, 3) else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in out
    ] + notes
