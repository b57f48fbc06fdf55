"""Run an in-process backend in a child process, so a native crash costs one run, not the session.

An in-process backend (llama.cpp today) is native code: a segfault, an abort or an
OOM kill inside it would end the pytest process and every result it holds. Here the
backend lives in a child Python process (`python -m pytest_tokperf.engines.child`)
that builds a *worker* and streams each request's chunks back over a socket pair,
each stamped (`perf_counter_ns`) in the child as the worker yielded it, and the end
of the stream; the pytest process keeps the driver and all bookkeeping.

A worker is any object with `info` (EngineInfo), `generate(request, stop)` (an
iterator of Chunks; `stop()` says the consumer is gone), `close()`, and whatever
methods `ChildEngine.call` names (e.g. `logits`). It is built in the child by
`module:function(settings)`.

When the child dies, every request issued to it that has not finished fails with the
signal (or exit code) and the last lines of its stderr; the next request issued
afterwards gets a fresh child. Requests run one at a time, in issue order, as they
did in process. The child dies with the pytest process (PR_SET_PDEATHSIG on Linux,
and the socket's end of file everywhere).

Test hook: `TOKPERF_CHILD_FAULT=SIGNAL@N` (e.g. `SIGSEGV@20`) makes the *first*
child an engine starts send SIGNAL to itself after it produced N tokens; later
children run normally. It exists so tests can crash a real engine mid-run.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import faulthandler
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from pytest_tokperf.engines import Chunk, Completion, EngineError, EngineInfo, Request

FAULT_ENV = "TOKPERF_CHILD_FAULT"
LOAD_TIMEOUT_S = 600.0  # a precision build (quantization) happens at load in the child
STOP_TIMEOUT_S = 10.0  # a child that does not stop within this after a cancel is killed
STDERR_LINES = 15
POLL_S = 0.1  # how soon a waiting reader notices a cancel


class Worker(Protocol):
    info: EngineInfo

    def generate(self, request: Request, stop: Callable[[], bool]) -> Iterator[Chunk]: ...

    def close(self) -> None: ...


class ChildDied(EngineError):
    """The engine child process ended while requests were running or waiting for it."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGKILL:
            return f"{name} (kill -9, or the kernel's out-of-memory killer)"
        return name
    return f"exit code {returncode}"


class _Child:
    """One child process; used only from the engine's single worker thread."""

    def __init__(self, target: str, settings: Mapping[str, Any], fault: str | None) -> None:
        self.target, self.settings, self.fault = target, dict(settings), fault
        self.process: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.stderr_path: Path | None = None
        self.death: ChildDied | None = None  # set once the child is known to be gone
        self.info: EngineInfo | None = None

    def alive(self) -> bool:
        return self.death is None and (self.process is None or self.process.poll() is None)

    def start(self) -> EngineInfo:
        """Spawn the child and build its worker; the worker's EngineInfo."""
        if self.info is not None:
            return self.info
        ours, theirs = socket.socketpair()
        folder = Path(tempfile.mkdtemp(prefix="tokperf-child-"))
        self.stderr_path = folder / "stderr.log"
        env = dict(os.environ)
        env.pop(FAULT_ENV, None)
        if self.fault:
            env[FAULT_ENV] = self.fault
        # the child must import this package from where the parent did, not from cwd
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with self.stderr_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        theirs.close()
        self.conn = Connection(ours.detach())
        atexit.register(self.kill)
        self.conn.send(("start", self.target, self.settings))
        reply = self.receive(LOAD_TIMEOUT_S, "loading the model")
        if reply[0] == "error":
            self.stop()
            raise EngineError(reply[2])
        self.info = reply[1]
        assert isinstance(self.info, EngineInfo)
        return self.info

    def receive(self, timeout_s: float | None, doing: str) -> tuple[Any, ...]:
        """The next message; a dead or silent child raises ChildDied."""
        assert self.conn is not None
        try:
            if timeout_s is None or self.conn.poll(timeout_s):
                message: tuple[Any, ...] = self.conn.recv()
                return message
        except (EOFError, OSError):
            raise self.died(doing) from None
        raise self.died(doing, f"did not answer within {timeout_s:g} s and was killed")

    def died(self, doing: str, killed: str | None = None) -> ChildDied:
        """The child's death as an error (once); `killed` says why we killed it."""
        if self.death is None:
            assert self.process is not None
            if killed is not None:
                self.kill()
            try:
                code = self.process.wait(5.0)
                how = killed or f"died with {describe_exit(code)}"
            except subprocess.TimeoutExpired:
                self.kill()
                how = "stopped answering and was killed"
            self.death = ChildDied(
                f"engine child process (pid {self.process.pid}) {how} while {doing}; "
                f"{self.stderr_tail()}"
            )
            self.close_conn()
        return self.death

    def stderr_tail(self) -> str:
        try:
            assert self.stderr_path is not None
            lines = self.stderr_path.read_text("utf-8", "replace").splitlines()
        except (OSError, AssertionError) as exc:
            return f"its stderr could not be read: {exc}"
        if not lines:
            return "its stderr was empty"
        tail = "\n".join(lines[-STDERR_LINES:])
        return f"last stderr lines ({self.stderr_path}):\n{tail}"

    def send(self, message: tuple[Any, ...], doing: str) -> None:
        if self.death is not None:
            raise self.death
        assert self.conn is not None
        try:
            self.conn.send(message)
        except OSError:
            raise self.died(doing) from None

    def close_conn(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5.0)

    def stop(self) -> None:
        """Ask the child to close its worker and exit; kill it if it does not."""
        if self.process is not None and self.alive():
            with contextlib.suppress(ChildDied):
                self.send(("close",), "closing")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(STOP_TIMEOUT_S)
        self.kill()
        self.close_conn()
        atexit.unregister(self.kill)
        if self.death is None and self.stderr_path is not None:  # a dead one's log is cited
            shutil.rmtree(self.stderr_path.parent, ignore_errors=True)


class ChildEngine:
    """The Engine protocol, served by a worker in a child process (restarted when it dies)."""

    def __init__(self, target: str, settings: Mapping[str, Any]) -> None:
        self._target, self._settings = target, dict(settings)
        self._fault = os.environ.get(FAULT_ENV) or None  # the test hook: first child only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokperf-child")
        self._child = self._new_child()
        self.info: EngineInfo = self._child.start()
        self.children_started = 1

    def _new_child(self) -> _Child:
        fault, self._fault = self._fault, None
        return _Child(self._target, self._settings, fault)

    def _current(self) -> _Child:
        """The child a request issued now goes to: a fresh one when the last one died."""
        if not self._child.alive():
            self._child.stop()
            self._child = self._new_child()
        return self._child

    @property
    def child_pid(self) -> int | None:
        """The running child's process id (None before a fresh child has started)."""
        process = self._child.process
        return process.pid if process is not None and self._child.alive() else None

    def _ready(self, child: _Child) -> None:
        if child.death is not None:
            raise child.death
        if child.info is None:
            child.start()
            self.children_started += 1

    def _generate(
        self,
        child: _Child,
        request: Request,
        put: Callable[[Any], None],
        cancelled: threading.Event,
    ) -> int:
        """Run `request` in the child, `put` each (time the child stamped it, chunk);
        when the stream ended in the child."""
        self._ready(child)
        child.send(("generate", request), f"running request {request.id!r}")
        cancel_sent = False
        while True:
            if cancelled.is_set() and not cancel_sent:
                child.send(("cancel",), f"cancelling request {request.id!r}")
                cancel_sent = True
            timeout = STOP_TIMEOUT_S if cancel_sent else POLL_S
            assert child.conn is not None
            try:
                ready = child.conn.poll(timeout)
            except OSError:
                ready = True  # recv below reports the death
            if not ready:
                if cancel_sent:
                    raise child.died(
                        f"running request {request.id!r}",
                        f"did not stop within {STOP_TIMEOUT_S:g} s of a cancel and was killed",
                    )
                continue
            message = child.receive(None, f"running request {request.id!r}")
            kind = message[0]
            if kind == "chunk":
                put((message[2], message[1]))
            elif kind == "done":
                ended: int = message[1]
                return ended
            elif kind == "error":
                raise EngineError(f"{message[1]}: {message[2]}")

    async def _timed(self, request: Request) -> AsyncIterator[tuple[int, Chunk | None]]:
        """(when the child stamped it, chunk) for each chunk the worker yielded, then
        (when the stream ended in the child, None). The child stamps each at the event,
        before it pickles and sends it: neither the socket, nor this process's reader
        thread, nor the hop to the event loop comes between (perf_counter_ns is one
        monotonic clock for every process on a machine)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Chunk | None] | BaseException] = asyncio.Queue()
        cancelled = threading.Event()
        child = self._current()

        def put(item: tuple[int, Chunk | None] | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancelled.set()

        def work() -> None:
            if cancelled.is_set():
                return
            try:
                put((self._generate(child, request, put, cancelled), None))
            except BaseException as exc:  # whatever happens, the consumer must hear of it
                put(exc)

        loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[1] is None:
                    return
        finally:
            cancelled.set()

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        async for _, chunk in self._timed(request):
            if chunk is not None:
                yield chunk

    async def stream_reads(
        self, request: Request, times: list[int], counts: list[int], texts: bool
    ) -> Completion:
        """The ReadEngine path the driver takes: each chunk with tokens at the time the
        child stamped it, the end at the child's end of the stream."""
        text: list[str] = []
        ids: list[int] = []
        end = 0
        async for at, chunk in self._timed(request):
            if chunk is None:
                end = at
                continue
            if chunk.tokens:  # a chunk of text alone is no token's arrival
                times.append(at)
                counts.append(chunk.tokens)
            if texts:
                text.append(chunk.text)
            ids.extend(chunk.token_ids)
        return Completion(None, 0, "".join(text), "", end, token_ids=tuple(ids))

    def call(self, method: str, *args: Any) -> Any:
        """Call the worker's `method(*args)` in the child, in turn with the requests."""

        child = self._current()

        def work() -> Any:
            self._ready(child)
            child.send(("call", method, args), f"calling {method}")
            reply = child.receive(None, f"calling {method}")
            if reply[0] == "error":
                raise EngineError(f"{reply[1]}: {reply[2]}")
            return reply[1]

        return self._executor.submit(work).result()

    async def aclose(self) -> None:
        self._executor.submit(self._child.stop).result()
        self._executor.shutdown(wait=True, cancel_futures=True)


# ---- the child side ------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when the parent's thread that spawned it ends."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent was gone before prctl took effect
        os._exit(1)


def _parse_fault(text: str | None) -> tuple[signal.Signals, int] | None:
    if not text:
        return None
    name, _, after = text.partition("@")
    return signal.Signals[name.strip().upper()], int(after or 0)


def serve(conn: Connection) -> None:
    """The child's loop: build the worker, then answer requests until closed or EOF."""
    _, target, settings = conn.recv()
    module, _, function = target.partition(":")
    try:
        worker: Worker = getattr(importlib.import_module(module), function)(settings)
    except Exception as exc:  # the parent raises it as an EngineError with this text
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    conn.send(("ready", worker.info))
    fault = _parse_fault(os.environ.get(FAULT_ENV))
    produced = 0
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        kind = message[0]
        if kind == "close":
            worker.close()
            return
        if kind == "cancel":  # arrived after the request finished: nothing to stop
            continue
        try:
            if kind == "generate":
                stopped = False

                def stop() -> bool:
                    nonlocal stopped
                    # any message while generating is a cancel (or EOF: the parent died)
                    stopped = stopped or conn.poll()
                    return stopped

                for chunk in worker.generate(message[1], stop):
                    # stamped as the worker yields it, before it is pickled and sent
                    conn.send(("chunk", chunk, time.perf_counter_ns()))
                    produced += chunk.tokens
                    if fault is not None and produced >= fault[1]:
                        os.kill(os.getpid(), fault[0])
                ended = time.perf_counter_ns()
                if stopped:
                    with contextlib.suppress(EOFError):
                        conn.recv()  # the cancel itself
                conn.send(("done", ended))
            elif kind == "call":
                conn.send(("result", getattr(worker, message[1])(*message[2])))
        except Exception as exc:
            conn.send(("error", type(exc).__name__, str(exc)))


def main(argv: list[str]) -> None:
    faulthandler.enable()  # a native crash prints the Python stack to stderr (the log)
    conn = Connection(int(argv[0]))
    _die_with_parent(int(argv[1]))
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        serve(conn)  # those mean the parent is gone: nobody to answer


if __name__ == "__main__":
    main(sys.argv[1:])
