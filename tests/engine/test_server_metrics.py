"""The server's own counters beside the client's, against recorded /metrics pages of
vLLM, SGLang, llama.cpp's server and TensorRT-LLM (tests/data/metrics/*.prom; each
file says where it came from), served by a loopback server that advances the page's
generated-token counter by what it streamed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pytest_tokperf import driver, launcher, server_metrics, verdict
from pytest_tokperf.engines import load_engine
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.runner import Tokperf

pytest.importorskip("prometheus_client", reason="needs the 'openai' extra")
pytest.importorskip("aiohttp", reason="needs the 'openai' extra")
PAGES = Path(__file__).parents[1] / "data" / "metrics"
FAKE = Path(__file__).with_name("fake_openai_server.py")


@pytest.mark.parametrize(
    ("page", "server", "tokens", "queue"),
    [
        ("vllm.prom", "vllm", 27453.0, 0.0),
        ("sglang.prom", "sglang", 7.557572e06, 2826.0),
        ("llamacpp.prom", "llama.cpp", 4096.0, 0.0),
        ("trtllm.prom", "tensorrt-llm", None, None),
    ],
)
def test_recorded_pages_parse(
    page: str, server: str, tokens: float | None, queue: float | None
) -> None:
    values = server_metrics.parse((PAGES / page).read_text())
    assert server_metrics.identify(values) == server
    names = server_metrics.SERVERS[server]
    assert server_metrics._pick(values, names.tokens) == tokens
    assert server_metrics._pick(values, names.queue) == queue


def _run(page: str, *flags: str, scenario: str = "offline"):  # type: ignore[no-untyped-def]
    cmd = f"{sys.executable} {FAKE} --port {{port}} --metrics {PAGES / page} {' '.join(flags)}"
    server = launcher.start(cmd, ready_timeout_s=60)
    loop = driver.new_loop()
    try:
        engine = load_engine("openai", {"base_url": server.base_url})
        runner = Tokperf(engine, BUILTIN["cpu"], loop)
        result = runner.run(scenario, requests=6, max_tokens=8, warmup=2)
        loop.run_until_complete(engine.aclose())
        return result, verdict.judge(result, {})
    finally:
        loop.close()
        server.stop()


@pytest.mark.parametrize("page", ["vllm.prom", "sglang.prom", "llamacpp.prom"])
def test_agreeing_counters_are_recorded_beside_the_client(page: str) -> None:
    result, outcome = _run(page)
    assert outcome.status == "PASS", outcome.invalid
    s = result.server
    assert s is not None and s["scrapes"] >= 2
    # 6 measured requests of 3 tokens; the 2 warm-up requests are not in the window
    assert s["generated_tokens"] == s["client_tokens"] == result.output_tokens == 18


def test_a_disagreeing_server_count_makes_the_run_invalid_with_both_numbers() -> None:
    _, outcome = _run("vllm.prom", "--metrics-scale", "1.5")
    assert outcome.status == "INVALID"
    (reason,) = outcome.invalid
    assert "the server counted 27 generated tokens (vllm" in reason and "the client 18" in reason


def test_a_queue_that_never_drains_in_offline_is_reported() -> None:
    result, _ = _run("sglang.prom", "--metrics-queue", "5")
    assert result.server is not None and result.server["queue_drained"] is False
    assert "never drained" in result.server["note"]


def test_a_server_without_a_token_counter_is_not_judged_on_tokens() -> None:
    result, outcome = _run("trtllm.prom")
    s = result.server
    assert s is not None and s["server"] == "tensorrt-llm" and s["generated_tokens"] is None
    assert outcome.status == "PASS"
