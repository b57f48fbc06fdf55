"""The rack verdict on synthetic nodes: known token timelines, known answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tokperf import rackjudge
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.hardware.inventory import read_inventory
from pytest_tokperf.hardware.recorded import RecordedNvml
from pytest_tokperf.rackjudge import Node, Timeline

NS = 1_000_000_000
DATA = Path(__file__).parent.parent / "data" / "nvml"


def steady(start_s: float, seconds: float, rate: float, requests: int = 8) -> list[RequestRecord]:
    """`requests` parallel streams, one token each every 1/rate*requests s: `rate` tokens/s."""
    gap = requests / rate
    out = []
    for i in range(requests):
        first = start_s + gap * i / requests
        times = []
        at = first
        while at <= start_s + seconds:
            times.append(int(at * NS))
            at += gap
        out.append(
            RequestRecord(f"r{i}", int(start_s * NS), times[-1], tuple(times), (1,) * len(times))
        )
    return out


def node(rank: int, start_s: float, seconds: float, rate: float, **payload: object) -> Node:
    records = steady(start_s, seconds, rate)
    data = {
        "verdict": "PASS",
        "profile": "sim",
        "scenario": "offline",
        "workload": "w",
        "engine": {"backend": "sim", "model": "m", "precision": "p", "devices": 4},
        "requests": 8,
        "failed": 0,
        "output_tokens": 1,
        "tokens_per_s": rate,
        "ttft_s": {"p99": 0.1},
        "tpot_s": {"p99": 0.01},
        "checks": [],
        **payload,
    }
    return Node(rank, f"host{rank}", data, rackjudge.timeline(records))


def test_timeline_counts_every_token_and_prorates_partial_bins() -> None:
    line = Timeline(0, 100, (10, 20, 30, 40))  # bins of 25 ns
    assert line.between(0, 100) == 100
    assert line.between(0, 25) == 10
    assert line.between(10, 35) == pytest.approx(10 * 15 / 25 + 20 * 10 / 25)
    assert line.between(200, 300) == 0
    records = steady(0.0, 2.0, 400.0)
    assert sum(rackjudge.timeline(records).tokens) == sum(r.output_tokens for r in records)


def test_rack_rate_is_the_sum_over_the_common_window() -> None:
    nodes = [node(0, 0.0, 10.0, 1000.0), node(1, 0.1, 10.0, 2000.0), node(2, 0.2, 10.0, 3000.0)]
    start, end, overlap = rackjudge.common_window(nodes)
    assert (start, end) == (int(0.2 * NS), pytest.approx(10 * NS, rel=1e-3))
    assert overlap == pytest.approx(9.8 / 10.0, rel=1e-3)
    row = rackjudge.judge("t", nodes, floor=5_500.0)
    assert row["tokens_per_s"] == pytest.approx(6000.0, rel=0.01)
    (floor,) = [c for c in row["checks"] if c["metric"] == "per_rack"]
    assert row["verdict"] == "PASS" and floor["ci_low"] > 5_500 and floor["kind"] == "rack"
    # every node's own verdict is a check of the rack's one judgment too
    assert [c["status"] for c in row["checks"] if c["metric"] == "node"] == ["PASS"] * len(
        row["rack"]["nodes"]
    )
    assert rackjudge.judge("t", nodes, floor=6_500.0)["verdict"] == "FAIL"
    assert row["tokens_per_s_per_gpu"] == pytest.approx(6000.0 / 12, rel=0.01)


def test_a_missing_or_failing_node_fails_the_rack_by_name() -> None:
    nodes = [node(0, 0.0, 5.0, 1000.0), node(1, 0.0, 5.0, 1000.0)]
    row = rackjudge.judge("t", nodes, floor=1.0, missing=["rank 2 (host2)"])
    assert row["verdict"] == "FAIL"
    assert "rank 2 (host2) sent no result" in rackjudge.message(row)
    slow = {
        "verdict": "FAIL",
        "checks": [{"metric": "per_gpu", "observed": 9.0, "limit": 10.0, "passed": False}],
    }
    nodes[1] = node(1, 0.0, 5.0, 1000.0, **slow)
    row = rackjudge.judge("t", nodes, floor=1.0)
    assert row["verdict"] == "FAIL"
    assert "rank 1 (host1) failed its own checks: per_gpu 9 < 10 [" in rackjudge.message(row)


def test_an_undecided_node_leaves_the_rack_undecided_and_says_why() -> None:
    nodes = [node(0, 0.0, 5.0, 1000.0), node(1, 0.0, 5.0, 1000.0)]
    assert rackjudge.judge("t", nodes, floor=1.0)["verdict"] == "PASS"
    short = "4 independent batch windows after the ramp, at least 6 needed"
    undecided = {
        "verdict": "INCONCLUSIVE",
        "checks": [
            {"metric": "per_gpu", "status": "INCONCLUSIVE", "limit": 1.0, "detail": short},
            {"metric": "ttft_p99_ms", "status": "INCONCLUSIVE", "limit": 500.0,
             "ci_low": 420.0, "ci_high": 610.0, "detail": ""},
        ],
    }  # fmt: skip
    nodes[1] = node(1, 0.0, 5.0, 1000.0, **undecided)
    row = rackjudge.judge("t", nodes, floor=1.0)  # the rack's own floor passes by far
    assert row["verdict"] == "INCONCLUSIVE"
    text = rackjudge.message(row)
    assert f"rank 1 (host1): INCONCLUSIVE (per_gpu: {short}; ttft_p99_ms: its interval " in text
    assert "420-610 straddles 500" in text and "rank 0" not in text


def test_too_little_overlap_different_runs_or_node_counts_are_invalid() -> None:
    apart = [node(0, 0.0, 10.0, 1000.0), node(1, 1.0, 10.0, 1000.0)]
    row = rackjudge.judge("t", apart, floor=1.0)
    assert row["verdict"] == "INVALID" and "ran together for 90.0%" in row["invalid"][0]
    other = [node(0, 0.0, 5.0, 1000.0), node(1, 0.0, 5.0, 1000.0, workload="other")]
    assert "rank 1 (host1) ran" in rackjudge.judge("t", other, floor=1.0)["invalid"][0]
    together = [node(0, 0.0, 5.0, 1000.0), node(1, 0.0, 5.0, 1000.0)]
    row = rackjudge.judge("t", together, floor=1.0, expected_nodes=18)
    assert row["invalid"] == ["the profile's rack is 18 nodes (its `nodes`), this rack run has 2"]


def test_clock_offsets_above_a_few_ms_are_reported() -> None:
    a, b = node(0, 0.0, 5.0, 1000.0), node(1, 0.0, 5.0, 1000.0)
    late = Node(b.rank, b.host, b.payload, b.timeline, offset_ns=12_000_000)
    row = rackjudge.judge("t", [a, late], floor=1.0)
    assert row["notes"] == [
        "rank 1 (host1)'s clock is +12.0 ms off rank 0's (over 5 ms: check NTP/PTP); "
        "windows were corrected by it"
    ]
    assert rackjudge.table([row])[-1] == f"t: note: {row['notes'][0]}"
    assert rackjudge.judge("t", [a, b], floor=1.0)["notes"] == []


def fabric(recording: str) -> tuple[tuple[str | None, int | None, int | None], ...]:
    inventory = read_inventory(RecordedNvml.load(DATA / recording))
    return tuple((g.fabric_cluster, g.fabric_clique, g.fabric_state) for g in inventory.gpus)


def test_recorded_gb300_nodes_read_their_nvlink_domain_as_raw_bytes() -> None:
    rack = fabric("gb300-node-4.json")
    assert rack == (("5c1e0a7b9d2f4e6a8b3c0d1e2f3a4b5c", 32766, 3),) * 4
    assert fabric("h100-sxm-8.json") == ((None, None, None),) * 8  # no fabric info: NotSupported


def test_a_node_from_another_nvlink_domain_is_named() -> None:
    same, other = fabric("gb300-node-4.json"), fabric("gb300-node-other-rack.json")
    nodes = [
        Node(r, f"host{r}", n.payload, n.timeline, 0, f)
        for r, (n, f) in enumerate(
            [(node(0, 0, 5, 1e3), same), (node(1, 0, 5, 1e3), same), (node(2, 0, 5, 1e3), other)]
        )
    ]
    (why,) = rackjudge.identity(nodes)
    assert why.startswith("rank 2 (host2) is in another NVLink domain (cluster 0badc0de")
    assert "clique 7" in why and "clique 32766" in why
    assert rackjudge.judge("t", nodes, floor=1.0)["verdict"] == "INVALID"
    assert rackjudge.identity(nodes[:2]) == []
    unregistered = Node(
        1,
        "host1",
        nodes[1].payload,
        nodes[1].timeline,
        0,
        (("5c1e0a7b9d2f4e6a8b3c0d1e2f3a4b5c", 32766, 2),) * 4,
    )
    assert "fabric registration" in rackjudge.identity([nodes[0], unregistered])[0]
