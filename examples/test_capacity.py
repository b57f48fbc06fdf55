"""Capacity as an assertion: the highest request rate that still meets the SLOs.

`tokperf.capacity()` estimates the saturation rate with an Offline run, probes the
floor's rate, then bisects on the rate while the budget lasts; each probe is a Server
run at Poisson arrivals judged SLO by SLO with LoadGen's early-stopping estimate.
`capacity_floor` passes when a probe at or above `min_qps` meets every SLO, and
fails when the probe at `min_qps` misses one by its observed percentile.

The cpu numbers are for the embedded SmolLM2-135M on a 2-core machine, one request
at a time: 8-token answers take about 0.1 s, so about 10 requests/s saturate it and
4 requests/s leave it well inside TTFT and TPOT limits. p90, not p99: a probe needs
LoadGen's minimum of samples (44 requests for p90, 459 for p99), and 53 requests at
4 requests/s keep each probe to about 13 s, the search to under a minute.
"""

from __future__ import annotations

import pytest


@pytest.mark.capacity_floor(
    min_qps={"cpu": 4, "sim": 4},
    ttft_p90_ms={"cpu": 1_000, "sim": 1_000},
    tpot_p90_ms={"cpu": 80, "sim": 40},
)
def test_serves_four_requests_a_second_inside_the_slos(tokperf):
    found = tokperf.capacity(max_tokens=8, budget_s=30)
    print(
        f"capacity {found.max_qps} requests/s, bracket "
        f"{found.last_pass_qps}-{found.first_fail_qps}, {len(found.probes)} probes, "
        f"{found.seconds:.0f} s"
    )
    assert any(p.qps == 4 for p in found.probes)  # the floor itself is always probed
