"""Serving acceptance: MLPerf Server and Interactive latency SLOs, and a floor decided early.

MLPerf Inference Llama-2-70B (mlcommons/inference, loadgen/mlperf.conf): Server
p99 TTFT <= 2,000 ms and p99
TPOT <= 200 ms under Poisson arrivals; Interactive p99 TTFT <= 450 ms, p99 TPOT <= 40 ms.
A p99 needs at least 459 requests (LoadGen early stopping), so the rack tests run the
profile's full-size workload and gate p99, while the cpu and sim profiles run a short
smoke test gated on p50 (7 requests suffice): a short run cannot be a valid p99, and
the plugin would say INVALID rather than pass it.

The cpu limits are for the embedded SmolLM2-135M on a 2-core machine, one request at a
time: TTFT about 40 ms unloaded, about 108 tokens/s single stream (TPOT about 9 ms);
at one request a second a request may queue behind another, and an xdist worker has
one core. 1,000 ms and 40 ms leave room for that without hiding a real regression.
"""

from __future__ import annotations

import pytest

RACKS = ("gb300-nvl72", "gb200-nvl72", "h100-sxm")
# MLPerf's per-GPU offered load is the deployment's business; these rates are examples
RACK_QPS = {"gb300-nvl72": 40.0, "gb200-nvl72": 32.0, "h100-sxm": 64.0}


@pytest.mark.latency_slo(
    ttft_p99_ms={name: 2_000 for name in RACKS}, tpot_p99_ms={name: 200 for name in RACKS}
)
def test_server_mlperf_slos(tokperf):
    """MLPerf Server on a rack node: the full workload, judged at p99."""
    tokperf.run("server", qps=RACK_QPS[tokperf.profile.name])


@pytest.mark.latency_slo(
    ttft_p99_ms={name: 450 for name in RACKS}, tpot_p99_ms={name: 40 for name in RACKS}
)
def test_interactive_mlperf_slos(tokperf):
    tokperf.run("interactive", qps=RACK_QPS[tokperf.profile.name] / 2)


@pytest.mark.latency_slo(
    ttft_p50_ms={"cpu": 1_000, "sim": 1_000}, tpot_p50_ms={"cpu": 80, "sim": 40}
)
# a dozen requests a second apart leave windows without tokens: too short to compare
# tokens/s with a baseline (its interval spans -50%..+100%), so only the SLOs gate it
@pytest.mark.no_regression(tokens_per_s=None)
def test_server_smoke_on_small_machines(tokperf):
    """One request a second for 12 s (a judged run lasts the profile's 10 s at least),
    short answers: TTFT and TPOT percentiles, gated at p50 (7 requests suffice)."""
    result = tokperf.run("server", qps=1, duration_s=12, max_tokens=8)
    assert result.ttft.count >= 7


@pytest.mark.throughput_floor(
    per_gpu={"gb300-nvl72": 15_200, "gb200-nvl72": 12_000, "h100-sxm": 3_000, "cpu": 5, "sim": 100}
)
def test_closed_loop_floor_decided_early(tokperf):
    """Four requests in flight for at most a minute; stops once the verdict is decisive."""
    tokperf.run("concurrency", concurrency=4, max_duration_s=60, max_tokens=32)
