"""A launched server holds the GPU locks too, and dies with a pytest killed by SIGKILL.

A real pytest process (recorded H200 box, real flock files) launches a small stdlib
server through --tokperf-server-cmd, then the test kills pytest with `kill -9`: no
clean-up code runs, so only the parent-death signal can stop the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_tokperf.hardware.allocation import try_lock

pytest.importorskip("aiohttp", reason="needs the 'openai' extra")
if not sys.platform.startswith("linux"):
    pytest.skip("reads /proc", allow_module_level=True)

DATA = Path(__file__).parent.parent / "data" / "nvml"
SERVER = """
import http.server, json, os, pathlib, sys

pathlib.Path("server.pid").write_text(str(os.getpid()))

class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Models).serve_forever()
"""
SUITE = """
import json, os, pathlib, time

def test_hold(tokperf_engine, tokperf_gpus):
    ready = {"pid": os.getpid(), "uuids": list(tokperf_gpus.uuids)}
    pathlib.Path("ready.tmp").write_text(json.dumps(ready))
    pathlib.Path("ready.tmp").rename("ready")
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped; only its reaping is pending


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, f"no {path.name} within {timeout_s} s"
        time.sleep(0.1)


def test_a_killed_pytest_takes_its_server_along_and_frees_the_gpu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    locks = pytester.path / "locks"
    monkeypatch.setenv("TOKPERF_NVML_RECORDING", str(DATA / "h200-8.json"))
    monkeypatch.setenv("TOKPERF_LOCK_DIR", str(locks))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytester.makepyfile(test_hold=SUITE)
    (pytester.path / "server.py").write_text(SERVER)
    command = f"{sys.executable} server.py {{port}}"
    pytest_proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tokperf-profile", "h200",
         "--tokperf-engine", "openai", "--tokperf-server-cmd", command],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = guard = 0
    try:
        _wait_for(pytester.path / "ready", pytest_proc)
        ready = json.loads((pytester.path / "ready").read_text())
        server = int((pytester.path / "server.pid").read_text())
        (uuid,) = ready["uuids"]
        assert ready["pid"] == pytest_proc.pid and _alive(server)
        guard = int(Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert guard != pytest_proc.pid and _alive(guard)  # the server's parent process
        # the server holds the GPU's lock file open: the lock is its too
        fds = Path(f"/proc/{server}/fd")
        held = {os.readlink(fd) for fd in fds.iterdir() if fd.name.isdigit()}
        assert str(locks / f"{uuid}.lock") in held
        assert try_lock(locks, uuid) is None

        pytest_proc.send_signal(signal.SIGKILL)  # no teardown, no atexit
        assert pytest_proc.wait(timeout=60) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while (_alive(server) or _alive(guard)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server), "the server outlived the killed pytest"
        assert not _alive(guard)
        lock = try_lock(locks, uuid)  # nobody holds the GPU any more
        assert lock is not None
        lock.release()
    finally:
        if pytest_proc.poll() is None:
            pytest_proc.kill()
        for pid in (server, guard):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
