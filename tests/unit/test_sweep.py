"""Sweep numbers on hand-made records: per-user speed, the Pareto frontier, the JSON."""

from __future__ import annotations

import pytest

from pytest_tokperf import figures, sweep
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.metrics import summarize

MS = 1_000_000


def _rec(id: str, issue_ms: int, first_ms: int, gap_ms: int, tokens: int) -> RequestRecord:
    chunks = tuple((issue_ms + first_ms + i * gap_ms) * MS for i in range(tokens))
    return RequestRecord(id, issue_ms * MS, chunks[-1], chunks, (1,) * tokens)


def test_per_user_is_the_median_of_one_over_tpot() -> None:
    records = [_rec("a", 0, 10, 10, 5), _rec("b", 0, 10, 20, 5), _rec("c", 0, 10, 40, 5),
               _rec("d", 0, 10, 5, 1)]  # fmt: skip
    result = summarize(records, EngineInfo("t", "m", "p", 2), scenario="concurrency",
                       workload="w", max_tokens=5, concurrency=4)  # fmt: skip
    # TPOTs 10, 20, 40 ms (the one-token request has none): 100, 50, 25 tokens/s
    assert sweep.per_user(result) == pytest.approx(50.0)
    found = sweep.Sweep("concurrency", "concurrency", (4.0,), (result,), {})
    (point,) = found.to_json()["points"]
    # 16 tokens over first issue 0 .. last end 170 ms; two devices
    assert point["tokens_per_s"] == pytest.approx(16 / 0.170)
    assert point["tokens_per_s_per_gpu"] == pytest.approx(16 / 0.170 / 2)
    assert point["status"] == "MEASURED" and point["goodput_tokens_per_s"] is None
    assert list(found) == [result] and len(found) == 1 and found[0] is result


def test_pareto_frontier_keeps_the_points_nothing_beats_on_both() -> None:
    points = [(10.0, 100.0), (20.0, 80.0), (15.0, 70.0), (30.0, 20.0), (5.0, 100.0)]
    # (15, 70) is beaten by (20, 80); (5, 100) by (10, 100)
    assert figures.frontier(points) == [(10.0, 100.0), (20.0, 80.0), (30.0, 20.0)]


def test_sim_prefill_knob_grows_ttft_with_the_prompt_words() -> None:
    from pytest_tokperf.engines import Request
    from pytest_tokperf.engines.sim import parse_settings, request_timeline

    s = parse_settings({"ttft_s": 0.02, "prefill_s_per_token": 0.0001, "jitter": 0.0})
    times, _ = request_timeline(s, Request("r", " ".join(["w"] * 1500), 3))
    assert times[0] == pytest.approx(0.02 + 1500 * 0.0001)
    plain, _ = request_timeline(parse_settings({"jitter": 0.0}), Request("r", "a b c", 3))
    assert plain[0] == pytest.approx(0.05)  # the knob's default leaves TTFT as it was
