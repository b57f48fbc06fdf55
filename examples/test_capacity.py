"""Capacity as an assertion: the highest request rate that still meets the SLOs.

`tokperf.capacity()` estimates the saturation rate with an Offline run, probes the
floor's rate, then bisects on the rate while the budget lasts; each probe is a Server
run at Poisson arrivals judged SLO by SLO with LoadGen's early-stopping estimate.
`capacity_floor` passes when a probe at or above `min_qps` meets every SLO, and
fails when the probe at `min_qps` misses one by its observed percentile.

The request-rate search runs on the sim profile (`pytest examples --tokperf-profile
sim`), skipped on the embedded cpu default: a Poisson probe needs LoadGen's minimum of
samples (44 requests for a p90, 459 for a p99) at each rate, and on a shared 2-core
machine the embedded SmolLM2-135M did not finish even the 16-request Offline estimate
in 60 s while other jobs loaded it (load average 6-8). The sim profile (4 slots, 100
tokens/s each, 8-token answers: about 0.12 s a request, so about 33 requests/s
saturate it) searches in about 25 s: the Offline estimate, the probe at 4 requests/s
(53 requests, about 14 s) and one more.

The closed-loop search (`min_concurrency`) runs on the embedded engine too: it keeps
N requests in flight, so a probe is as long as its samples take at the engine's own
pace, not a rate the engine may not keep. llama.cpp here serves one request at a
time, so with 2 in flight each request waits for the other's answer: its TTFT is
about one whole request (prefill and 8 tokens), well inside 2 s on an idle 2-core
machine, while its TPOT is the engine's own.
"""

from __future__ import annotations

import pytest


@pytest.mark.capacity_floor(min_qps={"sim": 4}, ttft_p90_ms={"sim": 1_000}, tpot_p90_ms={"sim": 40})
def test_serves_four_requests_a_second_inside_the_slos(tokperf):
    found = tokperf.capacity(max_tokens=8, budget_s=30)
    print(
        f"capacity {found.max_qps} requests/s, bracket "
        f"{found.last_pass_qps}-{found.first_fail_qps}, {len(found.probes)} probes, "
        f"{found.seconds:.0f} s"
    )
    assert any(p.qps == 4 for p in found.probes)  # the floor itself is always probed


@pytest.mark.capacity_floor(
    min_concurrency={"cpu": 2, "sim": 4},
    ttft_p90_ms={"cpu": 2_000, "sim": 1_000},
    tpot_p90_ms={"cpu": 200, "sim": 40},
)
def test_serves_two_requests_in_flight_inside_the_slos(tokperf):
    found = tokperf.capacity(max_tokens=8, budget_s=30, saturation_requests=4)
    print(
        f"capacity {found.max_concurrency} requests in flight, first fail "
        f"{found.first_fail}, {len(found.probes)} probes, {found.seconds:.0f} s"
    )
    assert found.probes[0].level == found.floors[0]  # the floor itself is probed first
