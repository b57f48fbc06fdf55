"""The openai engine against a real llama.cpp server running the embedded model.

The server (`python -m llama_cpp.server`, extra `llama-cpp-python[server]`) serves the
same GGUF file the in-process engine runs, on a free loopback port. Its sampler is
set to the in-process engine's greedy settings, and `--interrupt_requests False`
stops it from aborting a stream when the next request arrives (its default).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_tokperf import driver, launcher, workloads
from pytest_tokperf.engines import Request, load_engine

pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server]")
pytest.importorskip("aiohttp", reason="needs the 'openai' extra")

GREEDY = {"top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
# this server answers one request at a time: in Offline the last request's first token
# waits for all the others, which takes minutes on a busy 2-core machine
QUEUE_OK = {"first_token_timeout_s": 900}


def server_command() -> str:
    from pytest_tokperf.engines.llamacpp import default_threads, shipped_model_path

    threads = default_threads()
    return (
        f"{sys.executable} -m pytest_tokperf.engines.llamacpp_server "
        f"--model {shipped_model_path()} "
        f"--model_alias smollm2 --host 127.0.0.1 --port {{port}} --n_ctx 2048 "
        f"--n_threads {threads} --n_threads_batch {threads} --verbose False "
        "--interrupt_requests False"
    )


@pytest.fixture(scope="module")
def server() -> Iterator[launcher.Server]:
    server = launcher.start(server_command(), ready_timeout_s=120)
    yield server
    server.stop()


def test_http_and_in_process_engines_agree_token_for_token(server: launcher.Server) -> None:
    from pytest_tokperf.engines.llamacpp import shipped_model_path

    remote = load_engine(
        "openai",
        {
            "base_url": server.base_url,
            "tokenizer": str(shipped_model_path()),
            "extra_body": GREEDY,
            **QUEUE_OK,
        },
    )
    local = load_engine("llamacpp", {})
    assert remote.info.model == "smollm2"
    reqs = workloads.load(None).requests(6, 24, 24)
    loop = driver.new_loop()
    try:
        over_http = driver.run(remote, reqs, loop=loop)
        in_process = driver.run(local, reqs, loop=loop)
    finally:
        loop.run_until_complete(remote.aclose())
        loop.run_until_complete(local.aclose())
        loop.close()
    assert all(r.ok for r in over_http), [r.error for r in over_http]
    # same model, same greedy decoding, same chat template: the same answers
    assert [r.text for r in over_http] == [r.text for r in in_process]
    # the HTTP path counts by re-tokenizing the text (this server sends no usage), which
    # can split a word differently from how it was generated: allow one token per answer
    for http, local_ in zip(over_http, in_process, strict=True):
        assert abs(http.output_tokens - local_.output_tokens) <= 1, (http.id, http.text)


def test_the_plugin_launches_the_server_and_attaches_its_log(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.throughput_floor(min_tokens_per_s=1e9)
        def test_served(tokperf):
            # 10 requests: the fewest an Offline floor is judged on
            result = tokperf.run(requests=10, max_tokens=4, warmup=0)
            assert result.engine.backend == "openai"
        """
    )
    # no --tokperf-tokenizer: this server sends no usage, so its /extras/tokenize counts
    result = pytester.runpytest(
        "--tokperf-engine",
        "openai",
        "--tokperf-server-cmd",
        server_command(),
        "-p",
        "no:cacheprovider",
        "--tokperf-json",
        "out.json",
    )
    result.assert_outcomes(failed=1)
    (payload,) = json.loads((pytester.path / "out.json").read_text())["tests"]
    endpoint = "server tokenize endpoint /extras/tokenize/count"
    assert payload["token_counting"] == {endpoint: 10} and payload["failed"] == 0
    assert payload["engine"]["settings"]["token_counting"] == (
        f"usage; without usage: {endpoint}, after the run"
    )
    result.stdout.fnmatch_lines(
        [
            "tokperf: profile cpu (default), engine openai, model first served at *",
            "*tokperf server log (tail)*",
            "*(full log: *server.log)*",
        ]
    )
    assert (
        " < floor 1,000,000,000 [profile cpu, engine openai, model smollm2 served, 1 device, "
        "10 requests]" in result.stdout.str()
    )


def test_server_scenario_over_http_reports_latency_percentiles(server: launcher.Server) -> None:
    """MLPerf Server semantics through the openai engine: seeded Poisson arrivals at a
    modest rate this 2-core machine sustains, every request timed from its issue."""
    from pytest_tokperf.profiles import BUILTIN
    from pytest_tokperf.runner import Tokperf

    remote = load_engine("openai", {"base_url": server.base_url, "extra_body": GREEDY, **QUEUE_OK})
    loop = driver.new_loop()
    try:
        result = Tokperf(remote, BUILTIN["cpu"], loop).run(
            "server", qps=0.5, requests=8, max_tokens=8, warmup=1
        )
    finally:
        loop.run_until_complete(remote.aclose())
        loop.close()
    assert result.scenario == "server" and result.requests == 8 and result.failed == 0
    assert result.token_counting == {"server tokenize endpoint /extras/tokenize/count": 8}
    assert result.ttft.count == 8 and result.tpot.count > 0
    assert result.ttft.p50 is not None and result.ttft.p99 is not None
    assert 0 < result.ttft.p50 <= result.ttft.p99
    # each request was issued at its own scheduled time, not all at t0
    issues = sorted(r.issue_ns for r in result.records)
    assert issues[-1] - issues[0] > 1_000_000_000
    assert all(r.scheduled_ns is not None for r in result.records)


TAP = Path(__file__).with_name("sse_tap.py")
MS = 1_000_000
# distinct prompts: the tap knows a request by its prompt
PROMPTS = [
    "Name three colours.",
    "What is the capital of France?",
    "Count from one to ten.",
    "Write a haiku about the sea.",
    "What do bees make?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "Give me a word that rhymes with moon.",
    "What is two plus two?",
    "Say hello in Spanish.",
    "List four fruits.",
    "What is the opposite of hot?",
]


@pytest.mark.parametrize("counting", ["server endpoint", "gguf"])
def test_each_request_is_timed_as_an_independent_client_sees_its_stream(
    server: launcher.Server, tmp_path: Path, counting: str
) -> None:
    """The plugin against the test's own raw-socket client (`sse_tap.py`, a relay
    between the two, so both see the same streams), concurrency 2 on a server that
    sends no usage: per request, the first token and the end agree within the time a
    relayed read takes to reach the plugin, and so does TTFT. A count awaited before
    the end is stamped (a tokenize round trip queued behind the other request's
    generation) shows here as an end hundreds of ms late."""
    from pytest_tokperf.engines.llamacpp import shipped_model_path

    log = tmp_path / "tap.jsonl"
    tap = launcher.start(
        f"{sys.executable} {TAP} --port {{port}} --upstream {server.base_url} --log {log}",
        ready_timeout_s=30,
    )
    settings: dict[str, object] = {"base_url": tap.base_url, "extra_body": GREEDY, **QUEUE_OK}
    if counting == "gguf":
        settings["tokenizer"] = str(shipped_model_path())
    requests = [Request(f"r{i}", p, 48, detokenize=False) for i, p in enumerate(PROMPTS)]
    loop = driver.new_loop()
    try:
        engine = load_engine("openai", settings)
        plan = driver.Plan("concurrency", concurrency=2, texts=False)
        driven = driver.run_plan(engine, requests, plan, loop=loop)
        loop.run_until_complete(engine.aclose())
        deadline = time.monotonic() + 10  # the tap logs a response just after passing it on
        while len(log.read_text().splitlines()) < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.close()
        tap.stop()
    by = (
        "server tokenize endpoint /extras/tokenize/count"
        if counting == "server endpoint"
        else "GGUF tokenizer SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert dict(driven.token_counting) == {by: len(PROMPTS)}, [r.error for r in driven.records]
    seen = {t["prompt"]: t for t in map(json.loads, log.read_text().splitlines())}
    ends, firsts, ttfts = [], [], []
    for record, request in zip(driven.records, requests, strict=True):
        assert record.ok and record.first_chunk_ns is not None, record.error
        tapped = seen[request.prompt]
        ends.append(record.end_ns - tapped["end_ns"])
        firsts.append(record.first_chunk_ns - tapped["first_ns"])
        ttft = record.first_chunk_ns - record.issue_ns
        ttfts.append(ttft - (tapped["first_ns"] - tapped["request_ns"]))
    for name, gaps in (("end", ends), ("first token", firsts), ("TTFT", ttfts)):
        # the plugin reads each relayed read after the tap: a fraction of a ms, more
        # when the 2 cores are busy (scheduling noise); a count in the way is 100s of ms
        assert -MS < statistics.median(gaps) <= 5 * MS, (name, gaps)
        assert max(gaps) <= 30 * MS, (name, gaps)
