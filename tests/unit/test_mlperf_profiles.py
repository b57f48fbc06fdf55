"""The MLPerf profiles' limits against LoadGen's own mlperf.conf (a copy in tests/data,
from mlcommons/inference at the commit mlperf_models.SOURCE names)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tokperf import mlperf_models, profiles

CONF = Path(__file__).parent.parent / "data" / "mlperf" / "mlperf.conf"


def conf() -> dict[str, str]:
    """`model.scenario.key = value` lines, as LoadGen reads them (comments dropped)."""
    out = {}
    for line in CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, value = (part.strip() for part in line.split("=", 1))
            out[key] = value
    return out


def test_the_copy_is_the_cited_commit() -> None:
    assert mlperf_models.SOURCE.split("@")[1].split()[0] in CONF.read_text().splitlines()[0]


@pytest.mark.parametrize("model", sorted(mlperf_models.SLOS))
def test_each_models_limits_are_mlperf_confs(model: str) -> None:
    values = conf()
    for scenario, benchmark in (("server", model), ("interactive", f"{model}-interactive")):
        limits = mlperf_models.SLOS[model][scenario]
        assert limits == {
            "ttft_p99_ms": float(values[f"{benchmark}.Server.ttft_latency"]),
            "tpot_p99_ms": float(values[f"{benchmark}.Server.tpot_latency"]),
        }
        assert values[f"{benchmark}.Server.target_latency"] == "0"  # token latencies judge it
    assert (
        int(values[f"{model}.*.performance_sample_count_override"])
        == (mlperf_models.SAMPLES[model])
    )
    # MLPerf's percentile for Server runs, which the _p99_ keywords assume
    assert values["*.Server.target_latency_percentile"] == "99"


def test_the_profiles_carry_them() -> None:
    values = conf()
    assert mlperf_models.SLOS["llama2-70b"] == profiles.MLPERF_SLOS
    for name, (model, gpus, _) in mlperf_models.H200.items():
        p = profiles.BUILTIN[name]
        assert p.slos["interactive"]["tpot_p99_ms"] == float(
            values[f"{model}-interactive.Server.tpot_latency"]
        )
        assert p.requests == int(values[f"{model}.*.performance_sample_count_override"])
        assert p.min_duration_s * 1000 == float(values["*.Offline.min_duration"])
        assert (p.devices, p.tensor_parallel_size, p.floors) == (gpus, gpus, {})


def test_an_h200_box_is_still_detected_as_h200() -> None:
    # the new profiles come after `h200`: one H200 or eight, detection is unchanged
    order = [n for n in profiles.BUILTIN if profiles.BUILTIN[n].gpu_name == "H200"]
    assert order[0] == "h200"
