"""Faults around the results: SIGKILL, SIGINT, a killed xdist worker holding GPUs, a
read-only or full disk for --tokperf-json, a bad setting under --help.

Real processes and real signals on the sim engine (`--tokperf-profile sim`), whose
runs take a known time. Each test prints what it measured (time until the session
went on); docs/faults.md's fault table quotes those lines (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_tokperf import journal

QUIET = ("-p", "no:cacheprovider")
NVML = Path(__file__).parent.parent / "data" / "nvml"
DOCUMENT_KEYS = {"schema", "created", "packages", "machine", "profile", "inventory",
                 "summary", "tests"}  # fmt: skip


def pytest_process(where: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m pytest ARGS` in `where`, its own process (signals go to it alone).

    SIGINT as Ctrl-C delivers it, even when this run was started with SIGINT ignored
    (a background job of a non-interactive shell)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", *QUIET, *args],
        cwd=where,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"pytest ended before {what}:\n{proc.communicate()[0]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after 300 s:\n{proc.communicate()[0]}")
        time.sleep(0.02)


def journaled(path: Path) -> list[str]:
    """Node ids of the tests in a journal so far."""
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return [x["payload"]["nodeid"] for x in lines if x["kind"] == "test"]


SUITE = """
import pathlib
import pytest

@pytest.mark.parametrize("n", range({count}))
def test_run(tokperf, n):
    pathlib.Path(f"started-{{n}}").touch()
    tokperf.run(requests=4, max_tokens={tokens})
"""


def test_sigkill_after_two_tests_then_recover_both(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE.format(count=6, tokens=64))
    path = pytester.path / "out.json.journal"
    proc = pytest_process(pytester.path, "--tokperf-profile", "sim", "--tokperf-json", "out.json")
    wait_for("two journaled tests", lambda: len(journaled(path)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = journaled(path)
    assert not (pytester.path / "out.json").exists()  # the session never reached its end
    t0 = time.perf_counter()
    recovered = subprocess.run(
        [sys.executable, "-m", "pytest_tokperf", "recover", str(path), "--out", "rec.json"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - t0
    assert recovered.returncode == 0, recovered.stderr
    assert f"recovered {len(done)} test results" in recovered.stdout
    assert "the session did not finish" in recovered.stdout
    doc = json.loads((pytester.path / "rec.json").read_text())
    assert set(doc) == DOCUMENT_KEYS | {"recovered"}
    assert [t["nodeid"] for t in doc["tests"]] == sorted(done)
    assert {"test_suite.py::test_run[0]", "test_suite.py::test_run[1]"} <= set(done)
    assert all(t["verdict"] == "MEASURED" and t["requests"] == 4 for t in doc["tests"])
    assert doc["summary"]["MEASURED"] == len(done)
    assert doc["profile"]["name"] == "sim" and doc["recovered"]["session_finished"] is False
    print(f"\nFAULT sigkill: {len(done)} tests recovered; recover took {took:.2f} s")


SIGINT_SUITE = """
import pathlib
import pytest

def test_a(tokperf):
    tokperf.run(requests=4, max_tokens=8)

@pytest.mark.throughput_floor(per_gpu=1)
def test_b(tokperf):
    pathlib.Path("b-started").touch()
    tokperf.run(scenario="concurrency", concurrency=2, requests=200, max_tokens=32)

def test_c(tokperf):
    tokperf.run(requests=4, max_tokens=8)
"""


def test_sigint_mid_run_keeps_what_finished_and_exits_interrupted(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_suite=SIGINT_SUITE)
    proc = pytest_process(pytester.path, "--tokperf-profile", "sim", "--tokperf-json", "out.json")
    wait_for("test_b's run", (pytester.path / "b-started").exists, proc)
    time.sleep(1.0)  # test_b's run is under way: 200 requests take about 35 s
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    journal_path = pytester.path / "out.json.journal"
    wait_for("test_b journaled", lambda: len(journaled(journal_path)) == 2, proc)
    recorded = time.perf_counter() - t0
    out = proc.communicate(timeout=300)[0]
    took = time.perf_counter() - t0
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "Interrupted: tokperf: interrupted (SIGINT)" in out
    assert re.search(r"test_suite.py::test_b\s+concurrency\s+\d+ \(\d+ failed\).*INVALID", out)
    assert "results: out.json" in out
    doc = json.loads((pytester.path / "out.json").read_text())
    tests = {t["nodeid"]: t for t in doc["tests"]}
    assert sorted(tests) == ["test_suite.py::test_a", "test_suite.py::test_b"]  # c never ran
    assert tests["test_suite.py::test_a"]["verdict"] == "MEASURED"
    cut = tests["test_suite.py::test_b"]
    assert cut["verdict"] == "INVALID" and cut["stopped"] == "interrupted (SIGINT)"
    assert cut["invalid"][0].startswith("interrupted (SIGINT) after ")
    finished = cut["requests"] - cut["failed"]
    assert 0 < finished < cut["requests"] < 200  # issuing stopped; what finished is kept
    assert cut["output_tokens"] >= 32 * finished
    lines = journal_path.read_text().splitlines()
    assert json.loads(lines[-1]) == {**json.loads(lines[-1]), "kind": "end", "exitstatus": 2}
    print(
        f"\nFAULT sigint: {cut['invalid'][0]!r}; SIGINT to journaled {recorded:.2f} s, "
        f"to exit {took:.2f} s"
    )


BODY_SUITE = """
import pathlib
import time

def test_a(tokperf):
    tokperf.run(requests=4, max_tokens=8)
    pathlib.Path("a-ran").touch()
    time.sleep(300)  # the test's own code, after its run

def test_b(tokperf):
    tokperf.run(requests=4, max_tokens=8)
"""


def test_sigint_in_the_tests_own_code_keeps_its_finished_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=BODY_SUITE)
    proc = pytest_process(pytester.path, "--tokperf-profile", "sim", "--tokperf-json", "out.json")
    wait_for("test_a's run", (pytester.path / "a-ran").exists, proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "Interrupted: tokperf: interrupted (SIGINT) in the test's own code" in out
    (test,) = json.loads((pytester.path / "out.json").read_text())["tests"]
    assert test["nodeid"] == "test_suite.py::test_a" and test["verdict"] == "INVALID"
    assert test["failed"] == 0 and test["requests"] == 4  # the run itself had finished
    assert test["invalid"] == [
        "interrupted (SIGINT) in the test's own code after its last run, 4 of 4 requests "
        "finished; the session stops"
    ]


GPU_SUITE = """
import os
import pathlib
import time
import pytest

@pytest.mark.parametrize("n", range(16))
def test_run(tokperf, tokperf_gpus, n):
    me = os.environ["PYTEST_XDIST_WORKER"]
    pathlib.Path(me).write_text(str(os.getpid()))
    with open("ran.log", "a") as f:
        f.write(f"{me} {time.time()} {os.environ['CUDA_VISIBLE_DEVICES']}\\n")
    tokperf.run(workload="default")  # the built-in prompts: no MLPerf dataset here
"""
GPU_PROFILE = """
[profiles.h100-sim]
extends = "h100-sxm"
backend = "sim"
devices = 4
requests = 4
max_tokens = 128
warmup = 0
engine = { tokens_per_s = 100.0, ttft_s = 0.05, slots = 4 }
"""


def test_xdist_worker_killed_holding_gpus_loses_only_its_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist", reason="needs pytest-xdist (the 'test' extra)")
    monkeypatch.setenv("TOKPERF_NVML_RECORDING", str(NVML / "h100-sxm-8.json"))
    monkeypatch.setenv("TOKPERF_LOCK_DIR", str(pytester.path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytester.makefile(".toml", tokperf=GPU_PROFILE)
    pytester.makepyfile(test_suite=GPU_SUITE)
    path = pytester.path / "out.json.journal"
    proc = pytest_process(pytester.path, "-n", "2", "--tokperf-profile", "h100-sim",
                          "--tokperf-json", "out.json")  # fmt: skip
    wait_for("two journaled tests", lambda: len(journaled(path)) >= 2, proc)
    pid = pytester.path / "gw0"  # written by the worker; exists a moment before it holds the pid
    wait_for("gw0's pid", lambda: pid.exists() and pid.read_text().strip().isdigit(), proc)
    before = journaled(path)
    os.kill(int(pid.read_text()), signal.SIGKILL)
    killed, killed_at = time.perf_counter(), time.time()
    # the session goes on: the next result to arrive after the kill
    wait_for("a result after the kill", lambda: len(journaled(path)) > len(before) + 1, proc)
    back = time.perf_counter() - killed
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out
    # the failure and (terminal width allowing) the short summary both name it: one test
    crashed = set(re.findall(r"worker 'gw0' crashed while running '(.*?)'", out))
    assert len(crashed) <= 1 and "replacing crashed worker gw0" in out, out
    doc = json.loads((pytester.path / "out.json").read_text())
    tests = {t["nodeid"]: t for t in doc["tests"]}
    everything = {f"test_suite.py::test_run[{n}]" for n in range(16)}
    assert set(before) <= set(tests)  # nothing journaled before the kill is lost
    assert set(tests) == everything - set(crashed)  # only the test gw0 was running
    assert all(t["verdict"] == "MEASURED" and len(t["gpus"]) == 4 for t in tests.values())
    assert set(journaled(path)) == set(tests)
    # gw0 never released its GPUs; the kernel dropped its flocks: its replacement has them
    ran = [line.split() for line in (pytester.path / "ran.log").read_text().splitlines()]
    held = {w: set(gpus.split(",")) for w, _, gpus in ran}
    assert held["gw0"].isdisjoint(held["gw1"])
    replacements = sorted(set(held) - {"gw0", "gw1"})
    assert replacements, f"no test ran on gw0's replacement:\n{out}"
    assert all(held[w] == held["gw0"] for w in replacements)
    first = min(float(at) for w, at, _ in ran if w in replacements) - killed_at
    print(
        f"\nFAULT xdist kill -9: crashed {crashed}; next result {back:.2f} s after the "
        f"kill; gw0's replacement started its first test (with gw0's GPUs) after {first:.2f} s"
    )


RUN_TWO = """
def test_one(tokperf):
    tokperf.run(requests=2, max_tokens=4)

def test_two(tokperf):
    tokperf.run(requests=2, max_tokens=4)
"""


def read_only_dir(tmp: Path) -> Path:
    """A directory this process cannot create files in."""
    if os.geteuid() != 0:
        tmp.mkdir()
        tmp.chmod(0o555)
        return tmp
    # root ignores file modes; sysfs lets no one, root included, create a file
    return Path("/sys/tokperf-read-only")


def test_a_read_only_results_path_warns_and_the_results_still_show(
    pytester: pytest.Pytester,
) -> None:
    where = read_only_dir(pytester.path / "ro")
    pytester.makepyfile(test_suite=RUN_TWO)
    json_path = where / "out.json"
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "sim", "--tokperf-json", json_path)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            f"tokperf: cannot write {json_path}.journal: *; "
            "the results stay in memory until the end",
            "*test_one * MEASURED*",
            "*test_two * MEASURED*",
            f"tokperf: cannot write {json_path}: *; the results are in the terminal summary below",
        ]
    )
    result.stdout.no_fnmatch_line("results: *")
    result.stdout.no_fnmatch_line("*Traceback*")
    assert not json_path.exists()


def test_a_full_disk_keeps_the_old_results_file_whole(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=RUN_TWO)
    out = pytester.path / "out.json"
    out.write_text("the last session's results\n")
    # /dev/full fails every write with ENOSPC; pytester runs in this process (same pid)
    journal.path_for(out).symlink_to("/dev/full")
    (pytester.path / f".out.json.{os.getpid()}.tmp").symlink_to("/dev/full")
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "sim", "--tokperf-json", out)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "tokperf: cannot write *out.json.journal: No space left on device; "
            "the results stay in memory until the end",
            "*test_two * MEASURED*",
            "tokperf: cannot write *out.json: No space left on device; "
            "the results are in the terminal summary below",
        ]
    )
    assert out.read_text() == "the last session's results\n"  # never half a file
    assert not (pytester.path / f".out.json.{os.getpid()}.tmp").is_symlink()


def test_a_disk_filling_up_mid_session_stops_the_journal_not_the_session(
    pytester: pytest.Pytester,
) -> None:
    """RLIMIT_FSIZE caps every file the run writes, like a disk that fills up after
    the journal's header and first test: the second line is cut short (EFBIG)."""
    resource = pytest.importorskip("resource")
    pytester.makepyfile(test_suite=SUITE.format(count=3, tokens=8))

    def limited() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6_000, 6_000))  # header + 1 test

    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *QUIET, "--tokperf-profile", "sim",
         "--tokperf-json", "out.json"],
        cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=limited,
    )  # fmt: skip
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out  # the tests passed; the files are not the tests
    path = pytester.path / "out.json.journal"
    assert re.search(r"tokperf: cannot write out\.json\.journal: .*; journal stopped", out)
    assert re.search(r"cannot write .*out\.json: .*; the results are in the terminal summary", out)
    assert all(f"test_suite.py::test_run[{n}]" in out for n in range(3))  # the table
    assert not (pytester.path / "out.json").exists()
    kept = journal.read(path)
    assert [p["nodeid"] for p in kept.payloads] == ["test_suite.py::test_run[0]"]
    assert kept.torn and not kept.finished


def test_a_bad_setting_does_not_break_help(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKPERF_REQUESTS", "many")
    result = pytester.runpytest(*QUIET, "--help")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*--tokperf-requests=N*"])
    result = pytester.runpytest(*QUIET)  # a run still refuses it, naming the source
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: environment variable TOKPERF_REQUESTS must be a positive integer, got 'many'"]
    )
