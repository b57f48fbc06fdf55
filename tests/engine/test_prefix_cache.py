"""The embedded engine's prefix cache on the real model: its hit counts against a count
made independently from the tokenizer, and a run's hit-rate band through pytest."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from pytest_tokperf import cache, driver, profiles, workloads
from pytest_tokperf.engines import Request, load_engine
from pytest_tokperf.engines.llamacpp import LlamaCppEngine
from pytest_tokperf.runner import Tokperf
from pytest_tokperf.verdict import run_validity

pytest.importorskip("llama_cpp")

WORKLOAD = workloads.shared_prefix(groups=2, prefix_tokens=200, suffix_tokens=8, per_group=3)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = load_engine("llamacpp", {"n_threads": 2, "prefix_cache": True})
    assert isinstance(e, LlamaCppEngine)
    yield e
    asyncio.run(e.aclose())


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_hits_are_the_longest_prefix_seen_since_the_flush(engine) -> None:
    tokens = [engine.prompt_tokens(p.prompt) for p in WORKLOAD.prompts]
    expected = 0
    for i, t in enumerate(tokens):  # each prompt against every earlier one
        best = max((common(u, t) for u in tokens[:i]), default=0)
        expected += best - 1 if best == len(t) else best
    engine.flush_cache()
    before = engine.cache_counters()
    runner = Tokperf(engine, profiles.BUILTIN["cpu"])
    result = runner.run(workload=WORKLOAD, requests=6, max_tokens=2, warmup=0)
    after = engine.cache_counters()
    assert (after[0] - before[0], after[1] - before[1]) == (expected, sum(map(len, tokens)))
    assert result.cache is not None and result.cache["hit_rate"] == expected / sum(map(len, tokens))
    # the synthesized words are one token each here: 208 tokens past the template
    empty = len(engine.prompt_tokens(""))
    assert {len(t) - empty for t in tokens} == {208}


def test_a_flushed_cache_is_outside_a_primed_band(engine) -> None:
    c = cache.Cache(engine, lambda prompts: driver.run(
        engine, [Request(f"p{i}", p, 1) for i, p in enumerate(prompts)]))  # fmt: skip
    runner = Tokperf(engine, profiles.BUILTIN["cpu"])
    c.flush()
    cold = runner.run(workload=WORKLOAD, requests=6, max_tokens=2, warmup=0,
                      cache_hit_rate=(0.9, 1.0))  # fmt: skip
    rate = cold.cache["hit_rate"] if cold.cache else None
    assert rate is not None and rate < 0.9
    assert [r for r in run_validity(cold) if f"{rate:.3f}" in r and "[0.90, 1.00]" in r]
    c.prime(WORKLOAD)
    warm = runner.run(workload=WORKLOAD, requests=6, max_tokens=2, warmup=0,
                      cache_hit_rate=(0.9, 1.0))  # fmt: skip
    assert warm.cache is not None and warm.cache["hit_rate"] > 0.99
    assert not [r for r in run_validity(warm) if "prefix-cache" in r]


SUITE = """
import pytest
from pytest_tokperf import workloads

W = workloads.shared_prefix(groups=2, prefix_tokens=120, suffix_tokens=8, per_group=2)

def test_flushed(tokperf, tokperf_cache):
    tokperf_cache.flush()
    tokperf.run(workload=W, requests=4, max_tokens=2, warmup=0, cache_hit_rate=(0.9, 1.0))

def test_primed(tokperf, tokperf_cache):
    tokperf_cache.prime(W)
    tokperf.run(workload=W, requests=4, max_tokens=2, warmup=0, cache_hit_rate=(0.9, 1.0))
    assert tokperf_cache.hit_rate() > 0.9
"""


def test_the_fixture_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", tokperf='[profiles.cpu-cache]\nextends = "cpu"\n'
                      "engine = { prefix_cache = true, n_threads = 2 }\n")  # fmt: skip
    pytester.makepyfile(test_cache_suite=SUITE)
    out = pytester.runpytest("--tokperf-profile", "cpu-cache", "-p", "no:cacheprovider")
    out.assert_outcomes(passed=1, failed=1)
    text = out.stdout.str()
    assert "INVALID measurement: prefix-cache hit rate" in text
    assert "outside the band the test asked for [0.90, 1.00]" in text


def test_a_trace_on_the_embedded_engine_has_its_lengths(engine, tmp_path) -> None:
    import json

    from pytest_tokperf import trace

    rows = [
        {"timestamp": 0, "input_length": 600, "output_length": 24, "hash_ids": [1, 2]},
        {"timestamp": 200, "input_length": 530, "output_length": 40, "hash_ids": [1, 3]},
        {"timestamp": 400, "input_length": 60, "output_length": 16, "hash_ids": [9]},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    requests = trace.requests(trace.load(tmp_path / "t.jsonl"), trace.engine_words(engine))
    empty = len(engine.prompt_tokens(""))
    # the traced input lengths, by the engine's own tokenizer (its template aside)
    assert [len(engine.prompt_tokens(r.prompt)) - empty for r in requests] == [600, 530, 60]
    result = Tokperf(engine, profiles.BUILTIN["cpu"]).run(
        scenario="trace", workload=str(tmp_path / "t.jsonl"), warmup=0
    )
    # EOS ignored: every answer is its traced length, however early the model would stop
    assert sorted((r.id, r.output_tokens) for r in result.records) == [
        ("trace-0", 24), ("trace-1", 40), ("trace-2", 16)
    ]  # fmt: skip
    # the shared block 1 was served from the cache for the second request
    assert result.cache is not None and result.cache["hits"] >= 512
