"""Start the server a session measures, wait until it serves, and always stop it.

The command comes from the profile or `--tokperf-server-cmd`; `{port}` in it is
replaced by a free loopback port. The server's output goes to a log file whose tail
is attached to failing tests. It runs in its own process group, so stopping it
(terminate, then kill) also stops the workers it spawned, at session end, on an
interrupt, or when the interpreter exits.

A killed pytest runs no clean-up, so the server runs under a small guard (this file,
run as a script): the guard gets a signal when its parent dies (Linux's
PR_SET_PDEATHSIG; elsewhere it polls its parent) and then stops the server's process
group. The server inherits the GPU lock descriptors (`pass_fds`), so the GPUs stay
locked while it lives, even after pytest is gone, and free once it is gone too.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"  # trtllm-serve's and vLLM's default port
READY_PATHS = ("/health", "/v1/models")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
GUARD_GRACE_S = 10.0


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


def start(
    command: str,
    base_url: str | None = None,
    ready_timeout_s: float = 300.0,
    pass_fds: tuple[int, ...] = (),
) -> Server:
    """Run `command` and return once it answers on /health or /v1/models.

    The server inherits the descriptors `pass_fds` (the GPU locks) and dies with
    this process.
    """
    if "{port}" in command:
        port = free_port()
        command = command.replace("{port}", str(port))
        base_url = f"http://127.0.0.1:{port}"
    base_url = (base_url or DEFAULT_URL).rstrip("/").removesuffix("/v1")
    log_path = Path(tempfile.mkdtemp(prefix="tokperf-server-")) / "server.log"
    argv = shlex.split(command)
    if not argv or shutil.which(argv[0]) is None:
        raise LaunchError(f"cannot run server command {command!r}: no program {argv[:1]}")
    fds = ",".join(str(fd) for fd in pass_fds)
    guard = [sys.executable, __file__, str(os.getpid()), fds, "--", *argv]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            guard,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: we stop all of it
            pass_fds=pass_fds,
        )
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


# --- the guard: the server's parent process, run as `python launcher.py` ------------


def _die_with_parent(parent: int, sig: int) -> None:
    """Get `sig` when `parent` exits (PR_SET_PDEATHSIG; polled where there is none)."""
    if sys.platform.startswith("linux"):
        import ctypes

        # the signal comes when the thread that started us exits: pytest's main thread
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        return

    def watch() -> None:  # pragma: no cover - not Linux
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, daemon=True).start()  # pragma: no cover


def _guard(args: list[str]) -> int:
    """PARENT_PID FDS -- COMMAND...: run COMMAND; when PARENT_PID dies, stop its group."""
    parent, fds, command = int(args[0]), args[1], args[3:]
    _die_with_parent(parent, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        return 1
    children: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)  # the server and every worker it started
        # not `Popen.wait`: this handler interrupts the `wait` below, whose lock it
        # holds, so a second `wait` could never reap and sat out the whole grace period
        deadline = time.monotonic() + GUARD_GRACE_S
        with contextlib.suppress(ChildProcessError):  # reaped already: it has exited
            while children and os.waitpid(children[0].pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        os.killpg(0, signal.SIGKILL)  # whatever is left, this guard last
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    pass_fds = tuple(int(fd) for fd in fds.split(",") if fd)
    children.append(subprocess.Popen(command, pass_fds=pass_fds))  # in the guard's group
    code = children[0].wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(_guard(sys.argv[1:]))
