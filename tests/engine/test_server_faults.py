"""A llama.cpp server launched by the plugin and killed mid-stream: the tests fail, with
the server's log, and the session ends on time.

The server (`python -m llama_cpp.server`, the embedded model) is started by
`--tokperf-server-cmd` through `sh`, which writes its pid to a file and then becomes
the server; the test under pytester kills that pid with SIGKILL once tokens are
streaming. Other server faults (HTTP 500, a cut stream, a stall, bad JSON) are
tested against a misbehaving server in test_openai.py.
"""

from __future__ import annotations

import json
import shlex
import sys
import time

import pytest

pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server]")
pytest.importorskip("aiohttp", reason="needs the 'openai' extra")

SUITE = """
import os, signal, pathlib, pytest

PID = pathlib.Path({pidfile!r})

@pytest.mark.throughput_floor(per_gpu=0.05)
def test_a_server_dies(tokperf):
    killed = []

    def kill_once_streaming(snapshot, elapsed):
        if not killed and any(r.output_tokens for r in snapshot):
            os.kill(int(PID.read_text()), signal.SIGKILL)
            killed.append(elapsed)

    tokperf.progress = kill_once_streaming
    tokperf.run(scenario="concurrency", concurrency=1, requests=3, max_tokens=64, warmup=0)
    assert killed

@pytest.mark.throughput_floor(per_gpu=0.05)
def test_b_after(tokperf):
    tokperf.run(requests=2, max_tokens=8, warmup=0)
"""


def test_a_launched_server_killed_mid_stream_fails_the_tests_with_its_log(
    pytester: pytest.Pytester,
) -> None:
    from pytest_tokperf.engines.llamacpp import shipped_model_path

    pidfile = pytester.path / "server.pid"
    pytester.makepyfile(test_faults=SUITE.format(pidfile=str(pidfile)))
    model = shipped_model_path()
    serve = (
        f"exec {shlex.quote(sys.executable)} -m pytest_tokperf.engines.llamacpp_server "
        f"--model {model} "
        "--host 127.0.0.1 --port {port} --n_ctx 2048 --verbose False "
        "--interrupt_requests False"
    )
    command = f"sh -c {shlex.quote(f'echo $$ > {pidfile}; {serve}')}"
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        "--tokperf-engine",
        "openai",
        "--tokperf-server-cmd",
        command,
        "--tokperf-json",
        "out.json",
        "-p",
        "no:cacheprovider",
        "-o",
        f"tokperf_tokenizer={model}",
        timeout=600,  # a hang fails here instead of stalling the suite
    )
    print(f"\nserver killed mid-stream: session over after {time.monotonic() - start:.1f} s")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["*tokperf server log (tail)*", "*(full log: *server.log)*"])
    doc = json.loads((pytester.path / "out.json").read_text())
    tests = {t["nodeid"].split("::")[1]: t for t in doc["tests"]}
    assert tests["test_a_server_dies"]["verdict"] == "FAIL"
    assert tests["test_b_after"]["verdict"] == "FAIL"
    # the killed stream, then the refused connections of the requests after it
    killed = tests["test_a_server_dies"]["errors"]
    print("\n".join(killed))
    assert killed and "Cannot connect" not in killed[0], out
    assert any("Cannot connect" in e or "refused" in e for e in tests["test_b_after"]["errors"])
