"""tokperf.sweep through the gate on the sim engine of issue 23's acceptance (4 slots,
0.33 simulated s per request, time_scale 10: about 120 requests/s): every point in the
JSON, both figures in the HTML report with the SLO limits and the capacity marked."""

from __future__ import annotations

import json
import re

import pytest

ARGS = ("-p", "no:cacheprovider", "--tokperf-profile", "sim4", "--tokperf-json", "out.json",
        "--tokperf-html", "report.html")  # fmt: skip
PROFILE = """
[profiles.sim4]
extends = "sim"
max_tokens = 29
engine = { slots = 4, ttft_s = 0.05, tokens_per_s = 100.0, jitter = 0.2, time_scale = 10.0 }
"""
SUITE = """
import pytest

@pytest.mark.capacity_floor(min_qps=40, ttft_p90_ms=1000, tpot_p90_ms=100, budget_s=10)
def test_sweep_and_capacity(tokperf):
    points = tokperf.sweep(qps=[20, 60, 100, 140], duration_s=2)
    assert [r.qps for r in points] == [20, 60, 100, 140]
    tokperf.capacity(probe_s=3)

def test_concurrency_sweep(tokperf):
    tokperf.sweep(concurrency=[1, 2, 4], duration_s=2)
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOKPERF_PROFILE", "TOKPERF_RECORDS", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKPERF_MIN_DURATION", "2")


def test_sweep_json_and_html_figures(pytester: pytest.Pytester) -> None:
    pytest.importorskip("matplotlib")
    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makepyfile(test_sw=SUITE)
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(passed=2)
    doc = json.loads((pytester.path / "out.json").read_text())
    tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
    (swept,) = tests["test_sweep_and_capacity"]["sweeps"]
    found = tests["test_sweep_and_capacity"]["capacity"]
    assert swept["axis"] == "qps" and [p["qps"] for p in swept["points"]] == [20, 60, 100, 140]
    assert swept["slos_ms"] == {"ttft_p90_ms": 1000, "tpot_p90_ms": 100}
    assert swept["capacity_qps"] == found["max_qps"] and found["max_qps"] is not None
    for p in swept["points"]:
        # per GPU: the run's tokens/s over one device; per user: 100 simulated tokens/s
        # decoding at time_scale 10
        assert p["tokens_per_s_per_gpu"] == pytest.approx(p["tokens_per_s"])
        assert 700 < p["tokens_per_s_per_user"] < 1100
        # about qps x 2 s requests, each of 29 tokens
        assert 0.4 * 2 * p["qps"] < p["requests"] < 2 * 2 * p["qps"]
    low, high = swept["points"][0], swept["points"][-1]
    assert high["tokens_per_s"] > 2 * low["tokens_per_s"]  # throughput rises with the load
    assert high["ttft_p99_ms"] > low["ttft_p99_ms"]  # and so does queueing (140 > 120 qps)
    (conc,) = tests["test_concurrency_sweep"]["sweeps"]
    assert [p["concurrency"] for p in conc["points"]] == [1, 2, 4]
    assert conc["capacity_qps"] is None and conc["slos_ms"] == {}
    html = (pytester.path / "report.html").read_text()
    sections = {
        m["id"].split("::")[-1]: m["body"]
        for m in re.finditer(r'<section class="test" data-nodeid="(?P<id>[^"]+)">(?P<body>.*?)'
                             r"</section>", html, re.S)
    }  # fmt: skip
    figures = {
        name: {kind: re.findall(rf'<figure class="{kind}"><svg.*?</svg>\s*</figure>', body, re.S)
               for kind in ("sweep", "pareto")}
        for name, body in sections.items()
    }  # fmt: skip
    mine, other = figures["test_sweep_and_capacity"], figures["test_concurrency_sweep"]
    assert [len(mine["sweep"]), len(mine["pareto"]), len(other["sweep"])] == [1, 1, 1]
    (curve,), (pareto,) = mine["sweep"], mine["pareto"]
    assert "throughput vs latency" in curve and "TTFT p99 (ms)" in curve
    assert "SLO p90 1,000 ms" in curve and f"capacity {found['max_qps']:,.4g} requests/s" in curve
    assert "output tokens/s per user" in pareto and "output tokens/s per GPU" in pareto
    assert "Pareto frontier" in pareto and "SLO TPOT p90 100 ms" in pareto
    assert "capacity" in pareto
    assert "capacity" not in other["sweep"][0]  # a concurrency sweep: no capacity to mark


def test_bad_sweep_points_say_what_was_wrong(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.parametrize("kw, why", [
    ({"qps": [1, -2]}, "each point must be a positive number"),
    ({"concurrency": [1.5]}, "positive integer"),
    ({"qps": [1], "concurrency": [1]}, "one of them"),
    ({"qps": []}, "non-empty list"),
    ({"qps": [2, 2]}, "given twice"),
])
def test_bad(tokperf, kw, why):
    with pytest.raises(ValueError, match=why):
        tokperf.sweep(**kw)
"""
    )
    pytester.runpytest(*ARGS).assert_outcomes(passed=5)
