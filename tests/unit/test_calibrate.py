"""Calibration (pure parts): the tolerance factor and the proposals."""

from __future__ import annotations

import itertools
import math
import random
import sys

import pytest

from pytest_tokperf.calibrate import propose, tolerance_factor, toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.mark.parametrize(
    ("n", "p", "gamma", "table"),
    # one-sided normal tolerance factors (NIST/SEMATECH e-Handbook, Natrella's tables)
    [
        (5, 0.95, 0.90, 3.407),
        (10, 0.90, 0.95, 2.355),
        (20, 0.99, 0.95, 3.295),
        (5, 0.95, 0.95, 4.203),
    ],
)
def test_tolerance_factor_matches_the_tables(n: int, p: float, gamma: float, table: float) -> None:
    k = tolerance_factor(n, p, gamma)
    assert table <= k <= table * 1.015  # never below the exact factor, within 1.5%


def test_tolerance_bound_holds_by_simulation() -> None:
    """Lognormal runs: the floor from 5 runs lies below the 5th percentile in >= 90% of trials."""
    rng = random.Random(3)
    true_p05 = math.exp(math.log(100) - 1.6449 * 0.1)
    trials = 400
    held = 0
    for _ in range(trials):
        runs = [math.exp(rng.gauss(math.log(100), 0.1)) for _ in range(5)]
        docs = [{"tests": [_payload(r)]} for r in runs]
        (proposal,) = propose(docs, 0.95, 0.90)
        held += proposal.floor <= true_p05
    assert held / trials >= 0.87  # 0.90 nominal, 400 trials


def _payload(rate: float) -> dict:
    return {
        "nodeid": "t.py::test_a",
        "verdict": "PASS",
        "profile": "cpu",
        "tokens_per_s": rate,
        "engine": {"devices": 1},
        "ttft_s": {"p99": 0.05 * 100 / rate},
        "tpot_s": {"p99": None},
    }


def test_toml_snippet_parses_and_extends_the_profile() -> None:
    docs = [{"tests": [_payload(r)]} for r in (95.0, 100.0, 105.0, 98.0)]
    proposals = propose(docs, 0.95, 0.90)
    doc = tomllib.loads(toml(proposals, 0.95, 0.90, "pytest examples"))
    assert doc["profiles"]["cpu-calibrated"]["extends"] == "cpu"
    table = doc["calibrated"]["t.py::test_a"]
    assert table["per_gpu"] == doc["profiles"]["cpu-calibrated"]["floors"]["per_gpu"]
    assert table["min_tokens_per_s"] < 95.0
    assert table["latency_slo"]["ttft_p99_ms"] > 0.05 * 100 / 95.0 * 1000
    assert "tpot_p99_ms" not in table["latency_slo"]  # no samples in some run
    assert 0 < table["no_regression"]["tokens_per_s"] < 0.5


def test_the_tolerance_covers_the_comparisons_own_interval() -> None:
    """Runs whose rates agree to 0.1% but whose windows scatter: the drift alone would
    propose a tolerance of a fraction of a percent, under which each run compared with
    the one before is INCONCLUSIVE; the proposal reaches the interval's low end."""
    rng = random.Random(11)
    docs = []
    for rate in (100.0, 100.1, 99.9, 100.05, 99.95):
        windows = [rate * rng.gauss(1, 0.15) for _ in range(10)]
        docs.append({"tests": [_payload(rate) | {"windows_per_s": windows}]})
    (with_windows,) = propose(docs, 0.95, 0.90)
    (drift_only,) = propose([{"tests": [_payload(p["tokens_per_s"])]} for d in docs
                             for p in d["tests"]], 0.95, 0.90)  # fmt: skip
    assert drift_only.max_regression < 0.01
    # the widest interval of the four pairs, computed here from its definition
    lows = []
    for a, b in itertools.pairwise(docs):
        wa, wb = a["tests"][0]["windows_per_s"], b["tests"][0]["windows_per_s"]
        d = [math.log(x / y) for x, y in zip(wb, wa, strict=True)]
        sd = math.sqrt(sum((v - sum(d) / 10) ** 2 for v in d) / 9)
        ratio = sum(wb) / sum(wa)
        lows.append(ratio * math.exp(-2.2622 * sd / math.sqrt(10)))  # t(0.975, 9)
    assert with_windows.max_regression == pytest.approx(1 - min(lows), rel=1e-3)
    assert with_windows.max_regression > 0.05
