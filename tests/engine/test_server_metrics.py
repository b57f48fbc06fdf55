"""The server's own counters beside the client's, against recorded /metrics pages of
vLLM, SGLang, llama.cpp's server and TensorRT-LLM (tests/data/metrics/*.prom; each
file says where it came from), served by a loopback server that advances the page's
generated-token counter by what it streamed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
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


def _serve(page: str, *flags: str) -> launcher.Server:
    """The loopback server, serving this recorded page as its /metrics."""
    cmd = f"{sys.executable} {FAKE} --port {{port}} --metrics {PAGES / page} {' '.join(flags)}"
    return launcher.start(cmd, ready_timeout_s=60)


def _run(page: str, *flags: str, scenario: str = "offline"):  # type: ignore[no-untyped-def]
    server = _serve(page, *flags)
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
    assert outcome.status == "MEASURED", outcome.invalid  # valid; no floor gates it
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
    assert outcome.status == "MEASURED"  # valid: nothing to disagree with


@pytest.fixture
def vllm_page():  # type: ignore[no-untyped-def]
    server = _serve("vllm.prom")
    yield server
    server.stop()


def test_the_scrapes_during_a_run_come_from_a_child_process_not_a_thread(
    vllm_page: launcher.Server,
) -> None:
    """A thread would hold the interpreter while it parses, as tokens arrive, and make
    glibc lock on every read of the process from then on."""
    threads = threading.active_count()
    watch = server_metrics.Watch(f"{vllm_page.base_url}/metrics", every_s=0.1)
    with watch:
        deadline = time.monotonic() + 60  # SCHED_IDLE on a loaded CI machine: slow
        while os.pread(watch._out.fileno(), 1 << 20, 0).count(b"\n") < 3:
            assert time.monotonic() < deadline, "the child wrote no three scrapes in 60 s"
            time.sleep(0.1)
        assert threading.active_count() == threads
        assert watch._child is not None and watch._child.poll() is None
        if hasattr(os, "SCHED_IDLE"):  # it yields to every read of the client
            assert os.sched_getscheduler(watch._child.pid) == os.SCHED_IDLE
    assert watch._child.returncode == 0 and watch.error is None
    times = [at for at, _ in watch.samples]
    assert len(times) >= 5 and times == sorted(times)  # enter, the child's, exit
    assert times[-1] - times[0] >= 0.3  # three scrapes 0.1 s apart, at least
    assert all(server_metrics.identify(values) == "vllm" for _, values in watch.samples)


def test_a_server_that_stops_answering_mid_run_is_recorded_not_fatal(
    vllm_page: launcher.Server,
) -> None:
    watch = server_metrics.Watch(f"{vllm_page.base_url}/metrics", every_s=0.1)
    with watch:
        vllm_page.stop()
        time.sleep(0.5)
    assert len(watch.samples) == 1 and watch.error is not None
    assert watch.error.startswith(f"cannot read {vllm_page.base_url}/metrics")
    summary = watch.summary(client_tokens=10, scenario="offline")
    assert summary is not None and summary["error"] == watch.error


def test_a_scraper_that_cannot_start_is_reported(
    vllm_page: launcher.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_metrics, "CHILD", "import sys; sys.exit('no scraper here')")
    watch = server_metrics.Watch(f"{vllm_page.base_url}/metrics", every_s=0.1)
    with watch:
        time.sleep(0.3)
    assert watch.error == "the /metrics scraper failed: no scraper here"
    assert len(watch.samples) == 2  # enter and exit, from this process


def test_the_stall_benchmark_runs_and_its_page_parses() -> None:
    bench = Path(__file__).parents[2] / "benchmarks" / "scrape_stall.py"
    spec = importlib.util.spec_from_file_location("scrape_stall", bench)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.page(20)
    values = server_metrics.parse(text)
    assert len(text) >= 20 * 1024 and server_metrics.identify(values) == "vllm"
    assert values["vllm:latency_0_seconds_count"] == 510  # one family, summed labels
    out = subprocess.run(
        [sys.executable, str(bench), "--seconds", "1", "--every-s", "0.2", "--page-kb", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines()[2:]}
    assert set(rows) == {"no scrape", "child process (Watch)", "thread"}
    assert rows["no scrape"][0] == "0" and int(rows["thread"][0]) >= 3


def test_without_prometheus_client_the_run_says_what_to_install(
    vllm_page: launcher.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client.parser", None)  # not installed
    watch = server_metrics.Watch(f"{vllm_page.base_url}/metrics", every_s=0.1)
    with watch:
        pass
    assert watch._child is None and watch.samples == []
    assert watch.error is not None and "pip install 'pytest-tokperf[openai]'" in watch.error
    summary = watch.summary(client_tokens=10, scenario="offline")
    assert summary is not None and summary["error"] == watch.error
