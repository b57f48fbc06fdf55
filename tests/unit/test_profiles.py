"""Profile selection: command line > environment > ini > default; errors name the source."""

from __future__ import annotations

import pytest

from pytest_tokperf.profiles import BUILTIN, select


def test_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKPERF_PROFILE", raising=False)
    assert select(None, "", None)[0].name == "cpu"
    assert select(None, "", None)[1] == "default"
    assert select(None, "cpu", "tox.ini")[1] == "ini option tokperf_profile in tox.ini"
    monkeypatch.setenv("TOKPERF_PROFILE", "cpu")
    assert select(None, "gb300-nvl72", "tox.ini")[1] == "environment variable TOKPERF_PROFILE"
    assert select("cpu", "", None)[1] == "--tokperf-profile"


def test_unknown_profile_names_source_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKPERF_PROFILE", "gb300")
    with pytest.raises(pytest.UsageError) as info:
        select(None, "", None)
    message = str(info.value)
    assert "'gb300' (from environment variable TOKPERF_PROFILE)" in message
    assert all(name in message for name in BUILTIN)


def test_gpu_profiles_carry_the_published_floors() -> None:
    # shared FACTS.md: 15,200 per GPU on GB300 NVL72, ~12,000 on GB200, ~3,000 on H100
    assert BUILTIN["gb300-nvl72"].floors["per_gpu"] == 15_200
    assert BUILTIN["gb200-nvl72"].floors["per_gpu"] == 12_000
    assert BUILTIN["h100-sxm"].floors["per_gpu"] == 3_000
    # 18 nodes x 4 GPUs x 15,290 is the rack's 1,100,948 tokens/s, within rounding
    assert abs(18 * 4 * 15_290 - 1_100_948) / 1_100_948 < 0.001


def test_a_profile_whose_engine_is_missing_is_still_selected() -> None:
    # whether the engine ships is checked when it loads, after GPUs were allocated:
    # on a machine without the GPUs the tests skip for want of hardware first
    assert select("gb300-nvl72", "", None)[0].backend == "trtllm"
