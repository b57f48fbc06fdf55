"""Accuracy parity over HTTP: two real llama.cpp servers at different precisions.

The engine under test and its reference are both `python -m llama_cpp.server`
serving the embedded SmolLM2-135M, built at q4_0 and f16 (engines/precision.py). Never a
self-comparison: without a reference server the parity test errors. Runs are tiny
(3 prompts, 12 new tokens): CI has 2 cores.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from pytest_tokperf import launcher, report

pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server]")
pytest.importorskip("aiohttp", reason="needs the 'openai' extra")
pytest.importorskip("rouge_score", reason="needs the 'embedded' extra")

# the served engine: greedy like the in-process one; a one-at-a-time server's queue
# legitimately delays first tokens on a busy machine
PROFILE = """
[profiles.served]
extends = "cpu"
backend = "openai"
reference_precision = "f16"
engine.first_token_timeout_s = 900
engine.extra_body = { top_k = 1, top_p = 1.0, min_p = 0.0, repeat_penalty = 1.0 }
"""
SUITE = """
import pytest

@pytest.mark.accuracy_parity(dataset="questions.jsonl")
def test_parity(tokperf):
    tokperf.accuracy(samples=8, max_tokens=10)  # 8: the fewest a parity verdict takes
"""
QUESTIONS = "\n".join(
    json.dumps({"id": f"q{i}", "prompt": p})
    for i, p in enumerate(
        [
            "Name three primary colours.",
            "Why is the sky blue? Answer briefly.",
            "Write one sentence about the sea.",
            "What is two plus three?",
            "Name a large animal that lives in the ocean.",
            "What do bees make?",
            "Give one word that rhymes with cat.",
            "Which planet do we live on?",
        ]
    )
)


def command(precision: str) -> str:
    from pytest_tokperf.engines.llamacpp import shipped_model_path
    from pytest_tokperf.engines.precision import model_for

    model = model_for(precision, shipped_model_path())
    return (
        f"{sys.executable} -m pytest_tokperf.engines.llamacpp_server "
        f"--model {model} --model_alias smollm2 "
        "--host 127.0.0.1 --port {port} --n_ctx 1024 --n_threads 1 --n_threads_batch 1 "
        "--verbose False --interrupt_requests False"
    )


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, launcher.Server]]:
    started: dict[str, launcher.Server] = {}
    try:
        for precision in ("q4_0", "f16"):
            started[precision] = launcher.start(command(precision), ready_timeout_s=120)
        yield started
    finally:
        for server in started.values():
            server.stop()


def _run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict | None]:
    from pytest_tokperf.engines.llamacpp import shipped_model_path

    pytester.makefile(".toml", tokperf=PROFILE)
    pytester.makefile(".jsonl", questions=QUESTIONS)
    pytester.makepyfile(test_parity_http=SUITE)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--tokperf-profile", "served", "--tokperf-json", "out.json",
        "-o", f"tokperf_tokenizer={shipped_model_path()}", *args,
    )  # fmt: skip
    doc = json.loads((pytester.path / "out.json").read_text())
    tests = [t for t in doc["tests"] if t.get("kind") == report.PARITY_KIND]
    return result, tests[0] if tests else None


def test_parity_without_a_reference_server_errors(
    pytester: pytest.Pytester, servers: dict[str, launcher.Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("BASE_URL", "SERVED_MODEL", "SERVER_CMD"):
        monkeypatch.delenv(f"TOKPERF_REFERENCE_{name}", raising=False)
    result, parity = _run(pytester, "--tokperf-base-url", servers["q4_0"].base_url)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*no reference for accuracy parity: accuracy parity on the openai engine needs a "
            "reference server at the f16 precision: set --tokperf-reference-base-url (env*"
        ]
    )
    assert parity is None
    # the server under test named as its own reference is refused too
    url = servers["q4_0"].base_url
    result, _ = _run(pytester, "--tokperf-base-url", url, "--tokperf-reference-base-url", url)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*the reference server {url} is the server under test*"])


def test_q4_0_server_against_an_f16_server_fails(
    pytester: pytest.Pytester, servers: dict[str, launcher.Server]
) -> None:
    result, parity = _run(
        pytester,
        "--tokperf-base-url", servers["q4_0"].base_url,
        "--tokperf-precision", "q4_0",
        "--tokperf-reference-base-url", servers["f16"].base_url,
    )  # fmt: skip
    result.assert_outcomes(failed=1)
    assert parity is not None and parity["verdict"] == "FAIL"
    assert (parity["precision"], parity["reference_precision"]) == ("q4_0", "f16")
    assert parity["engine"]["settings"]["base_url"] == servers["q4_0"].base_url
    assert parity["reference_engine"]["settings"]["base_url"] == servers["f16"].base_url
    assert parity["scores"]["rougeL_ratio"] < 0.99
    assert parity["scores"]["exact_match"] is None  # no token ids over HTTP


def test_f16_server_against_a_launched_f16_server_passes(
    pytester: pytest.Pytester, servers: dict[str, launcher.Server]
) -> None:
    result, parity = _run(
        pytester,
        "--tokperf-base-url", servers["f16"].base_url,
        "--tokperf-precision", "f16",
        "--tokperf-reference-server-cmd", command("f16"),
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    assert parity is not None and parity["verdict"] == "PASS"
    reference_url = parity["reference_engine"]["settings"]["base_url"]
    assert reference_url not in (servers["f16"].base_url, servers["q4_0"].base_url)
    assert parity["scores"]["rougeL_ratio"] == 1.0 and parity["scores"]["exact_match"] is None
