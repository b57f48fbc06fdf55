"""Metrics on synthetic records, each number checked against an independent calculation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.metrics import (
    NS,
    Distribution,
    output_tokens_per_s,
    percentile,
    span_ns,
    summarize,
    tpot_s,
    ttft_s,
)

INFO = EngineInfo("test", "m", "f16", devices=4)


def record(id: str, issue: int, chunks: list[int], tokens: list[int] | None = None, error=None):
    return RequestRecord(
        id=id,
        issue_ns=issue,
        end_ns=chunks[-1] if chunks else issue + 1,
        chunk_ns=tuple(chunks),
        chunk_tokens=tuple(tokens if tokens is not None else [1] * len(chunks)),
        error=error,
    )


@st.composite
def records(draw: st.DrawFn) -> list[RequestRecord]:
    out = []
    for i in range(draw(st.integers(1, 20))):
        issue = draw(st.integers(0, 10**9))
        gaps = draw(st.lists(st.integers(1, 10**8), min_size=1, max_size=30))
        chunks = [issue + sum(gaps[: k + 1]) for k in range(len(gaps))]
        tokens = draw(st.lists(st.integers(1, 8), min_size=len(gaps), max_size=len(gaps)))
        out.append(record(f"r{i}", issue, chunks, tokens))
    return out


def test_offline_rate_by_hand() -> None:
    # three requests issued at t=0: 10 + 20 + 30 tokens, last completion at 2 s
    recs = [
        record("a", 0, [NS // 2] * 10),
        record("b", 0, [NS] * 20),
        record("c", 0, [2 * NS] * 30),
    ]
    assert span_ns(recs) == 2 * NS
    assert output_tokens_per_s(recs) == pytest.approx(60 / 2)


def test_tpot_and_ttft_by_hand() -> None:
    # issued at 1 s, first token at 1.25 s, 5 tokens, done at 2.25 s: TPOT = 1 s / 4
    r = record("a", NS, [int(1.25 * NS), int(1.5 * NS), int(1.75 * NS), 2 * NS, int(2.25 * NS)])
    assert ttft_s(r) == pytest.approx(0.25)
    assert tpot_s(r) == pytest.approx(0.25)
    assert tpot_s(record("one", 0, [NS])) is None  # one token has no "per output token" time
    assert ttft_s(record("none", 0, [])) is None


def test_percentile_follows_loadgen_rule() -> None:
    values = list(range(1, 65))  # 64 samples
    assert percentile(values, 0.99) == 64  # int(64 * .99) = 63 -> the maximum
    assert percentile(values, 0.50) == 33
    assert percentile([5.0], 0.999) == 5.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300), st.floats(0, 1))
def test_percentile_rank_property(values: list[float], p: float) -> None:
    # an independent statement of the rule: exactly int(n*p) values lie strictly below
    # the chosen one's position, and the value is one of the samples
    v = percentile(values, p)
    n = len(values)
    k = min(int(n * p), n - 1)
    assert v in values
    assert sum(1 for x in values if x < v) <= k < sum(1 for x in values if x <= v)


@given(st.lists(st.floats(0, 1e3), min_size=1, max_size=100))
def test_percentiles_are_monotone(values: list[float]) -> None:
    d = Distribution.of(values)
    assert d.count == len(values)
    assert min(values) <= d.p50 <= d.p90 <= d.p95 <= d.p99 <= d.p999 <= max(values)
    assert d.mean is not None and min(values) <= d.mean * (1 + 1e-12) + 1e-9


@given(records())
def test_rate_never_beats_the_shortest_possible_span(recs: list[RequestRecord]) -> None:
    total = sum(r.output_tokens for r in recs)
    longest = max(r.end_ns - r.issue_ns for r in recs)  # the span covers every request
    assert output_tokens_per_s(recs) <= total * NS / longest * (1 + 1e-9)


@given(records(), st.integers(1, 72))
def test_summary_matches_independent_sums(recs: list[RequestRecord], devices: int) -> None:
    info = EngineInfo("test", "m", "fp4", devices=devices)
    res = summarize(recs, info, scenario="offline", workload="w", max_tokens=None)
    span = max(r.end_ns for r in recs) - min(r.issue_ns for r in recs)
    tokens = sum(sum(r.chunk_tokens) for r in recs)
    assert res.output_tokens == tokens
    assert res.duration_s == pytest.approx(span / 1e9)
    assert res.tokens_per_s == pytest.approx(tokens / (span / 1e9))
    assert res.tokens_per_s_per_gpu == pytest.approx(res.tokens_per_s / devices)
    assert res.requests_per_s == pytest.approx(len(recs) / (span / 1e9))
    assert res.tokens_per_sample == pytest.approx(tokens / len(recs))
    assert res.ttft.count == len(recs)
    ttfts = sorted((r.chunk_ns[0] - r.issue_ns) / 1e9 for r in recs)
    assert res.ttft.p50 == pytest.approx(ttfts[int(len(ttfts) * 0.5)])
    assert res.ttft.p99 == pytest.approx(ttfts[min(int(len(ttfts) * 0.99), len(ttfts) - 1)])


def test_failed_requests_count_in_span_not_in_tokens() -> None:
    ok = record("ok", 0, [NS] * 10)
    bad = record("bad", 0, [NS // 2] * 3 + [3 * NS], error="boom")
    res = summarize([ok, bad], INFO, scenario="offline", workload="w", max_tokens=8)
    assert res.failed == 1 and res.requests == 2
    assert res.output_tokens == 10
    assert res.duration_s == pytest.approx(3.0)  # the failed request still held the engine
    assert res.tokens_per_s == pytest.approx(10 / 3)
    assert res.tokens_per_s_per_gpu == pytest.approx(10 / 3 / 4)
    assert res.errors == ["bad: boom"]
    assert res.ttft.count == 1


def test_no_time_means_no_rate() -> None:
    res = summarize([record("x", 5, [5])], INFO, scenario="offline", workload="w", max_tokens=1)
    assert res.tokens_per_s == 0.0 and not math.isnan(res.requests_per_s)
