"""Start the server a session measures, wait until it serves, and always stop it.

The command comes from the profile or `--tokperf-server-cmd`; `{port}` in it is
replaced by a free loopback port. The server's output goes to a log file whose tail
is attached to failing tests. It runs in its own process group, so stopping it
(terminate, then kill) also stops the workers it spawned, at session end, on an
interrupt, or when the interpreter exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"  # trtllm-serve's and vLLM's default port
READY_PATHS = ("/health", "/v1/models")


class LaunchError(Exception):
    """The server did not start serving; the message carries the log's tail."""


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:]) + f"\n(full log: {self.log_path})"

    def stop(self, grace_s: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ready(base_url: str) -> bool:
    for path in READY_PATHS:
        try:
            with urllib.request.urlopen(base_url + path, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            continue
    return False


def start(command: str, base_url: str | None = None, ready_timeout_s: float = 300.0) -> Server:
    """Run `command` and return once it answers on /health or /v1/models."""
    if "{port}" in command:
        port = free_port()
        command = command.replace("{port}", str(port))
        base_url = f"http://127.0.0.1:{port}"
    base_url = (base_url or DEFAULT_URL).rstrip("/").removesuffix("/v1")
    log_path = Path(tempfile.mkdtemp(prefix="tokperf-server-")) / "server.log"
    with log_path.open("wb") as log:
        try:
            process = subprocess.Popen(
                shlex.split(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: we stop all of it
            )
        except OSError as exc:
            raise LaunchError(f"cannot run server command {command!r}: {exc}") from None
    server = Server(process, base_url, log_path)
    atexit.register(server.stop)
    deadline = time.monotonic() + ready_timeout_s
    while not _ready(base_url):
        if process.poll() is not None:
            raise LaunchError(
                f"server command {command!r} exited with code {process.returncode} before "
                f"serving at {base_url}; its log:\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            server.stop()
            raise LaunchError(
                f"server command {command!r} did not answer at {base_url} "
                f"({' or '.join(READY_PATHS)}) within {ready_timeout_s:g} s; its log:\n"
                f"{server.log_tail()}"
            )
        time.sleep(0.25)
    return server
