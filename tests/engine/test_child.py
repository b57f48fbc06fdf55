"""The embedded engine's child process on the real model: crashes, kills and bad files.

Each fault is real: a signal sent to the real child with os.kill, a child that
crashes itself through the documented test hook, a real truncated GGUF file. Run
with `-s` to see how long each fault took until the engine answered again (the
figures in docs/faults.md, "What happens when things break").
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pytest_tokperf.driver import run
from pytest_tokperf.engines import (
    Chunk,
    EngineError,
    EngineInfo,
    Request,
    child,
    llamacpp,
    load_engine,
)
from pytest_tokperf.engines.child import FAULT_ENV, describe_exit
from pytest_tokperf.engines.llamacpp import (
    LlamaCppEngine,
    choose_extra_bufts,
    cpu_amx_flags,
    shipped_model_path,
)

pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")

PROMPTS = ["Name three colours.", "Count to ten.", "Write a haiku about rain."]


@pytest.fixture
def engine() -> Iterator[LlamaCppEngine]:
    e = load_engine("llamacpp", {"n_threads": 2})
    assert isinstance(e, LlamaCppEngine)
    yield e
    asyncio.run(e.aclose())


class KillAfter:
    """Sends `sig` to the engine's child once request `victim` has streamed `after` tokens."""

    def __init__(self, engine: LlamaCppEngine, sig: int, victim: str, after: int) -> None:
        self.engine, self.sig, self.victim, self.after = engine, sig, victim, after
        self.killed_at: float | None = None

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        seen = 0
        async for chunk in self.engine.stream(request):
            yield chunk
            seen += chunk.tokens
            if request.id == self.victim and seen == self.after:
                pid = self.engine.child_pid
                assert pid is not None
                os.kill(pid, self.sig)
                self.killed_at = time.monotonic()

    async def aclose(self) -> None:
        await self.engine.aclose()


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
def test_a_child_killed_mid_run_fails_the_requests_in_flight_and_the_next_run_works(
    engine: LlamaCppEngine, sig: signal.Signals
) -> None:
    reference = run(engine, [Request("ref", PROMPTS[2], 16)])[0]
    first_pid = engine.child_pid
    killer = KillAfter(engine, sig, "r1", 5)
    reqs = [Request(f"r{i}", p, 16) for i, p in enumerate(PROMPTS)]
    records = {r.id: r for r in run(killer, reqs)}
    assert records["r0"].ok and records["r0"].output_tokens == 16  # finished before: kept
    victim = records["r1"]
    assert victim.output_tokens == 5  # what arrived before the crash is kept
    for rec in (victim, records["r2"]):  # r2 waited for the same child: failed too
        assert rec.error is not None and f"died with {sig.name}" in rec.error, rec.error
        assert f"pid {first_pid}" in rec.error
    if sig == signal.SIGSEGV:  # faulthandler's report is in the stderr tail
        assert "Fatal Python error: Segmentation fault" in (victim.error or "")
    else:
        assert "kill -9, or the kernel's out-of-memory killer" in (victim.error or "")
    # the next run gets a fresh child and the same greedy answer as before the crash
    (after,) = run(engine, [Request("ref", PROMPTS[2], 16)])
    assert killer.killed_at is not None
    print(f"\n{sig.name} mid-run: next answer {time.monotonic() - killer.killed_at:.2f} s later")
    assert after.ok and after.token_ids == reference.token_ids
    assert engine.child_pid not in (None, first_pid) and engine.children_started == 2


def test_a_child_killed_between_runs_is_replaced_transparently(engine: LlamaCppEngine) -> None:
    (before,) = run(engine, [Request("a", PROMPTS[0], 8)])
    pid = engine.child_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(0.2)  # the kernel reaps it; nobody in the parent is reading
    (again,) = run(engine, [Request("a", PROMPTS[0], 8)])
    print(f"\nkill -9 between runs: next answer {time.monotonic() - killed:.2f} s later")
    assert again.ok and again.token_ids == before.token_ids
    assert engine.child_pid != pid and engine.children_started == 2


def test_the_crash_hook_crashes_the_first_child_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "SIGSEGV@3")
    engine = load_engine("llamacpp", {"n_threads": 2})
    try:
        (crashed,) = run(engine, [Request("a", PROMPTS[1], 8)])
        (fine,) = run(engine, [Request("a", PROMPTS[1], 8)])
    finally:
        asyncio.run(engine.aclose())
    assert crashed.output_tokens == 3 and "died with SIGSEGV" in (crashed.error or "")
    assert fine.ok and fine.output_tokens == 8


def test_logits_come_through_the_child_and_a_crash_there_is_an_engine_error(
    engine: LlamaCppEngine,
) -> None:
    continuation = engine.prompt_tokens("Blue.")[-3:]
    rows = engine.logits("Name a colour.", continuation)
    assert rows.shape[0] == 3 and rows.dtype.name == "float32"
    pid = engine.child_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    # killed while idle: the call goes to a fresh child and answers the same
    again = engine.logits("Name a colour.", continuation)
    assert (again == rows).all()


def test_the_child_dies_with_the_pytest_process(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys\n"
        "from pytest_tokperf.engines import load_engine\n"
        "e = load_engine('llamacpp', {'n_threads': 1})\n"
        "print(e.child_pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"  # no cleanup at all: atexit does not run
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"engine child {child} outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has died
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("cut", [0.5, 0.02], ids=["half", "header-only"])
def test_a_truncated_gguf_is_a_clear_load_error(tmp_path: Path, cut: float) -> None:
    data = shipped_model_path().read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: int(len(data) * cut)])
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"llama\.cpp could not load .*truncated\.gguf"):
        load_engine("llamacpp", {"model_path": str(bad)})
    print(f"\ntruncated GGUF ({cut:.0%}): load error after {time.monotonic() - start:.2f} s")


def test_a_corrupt_gguf_header_is_a_clear_load_error(tmp_path: Path) -> None:
    data = bytearray(shipped_model_path().read_bytes()[: 1 << 20])
    data[8:24] = b"\xff" * 16  # absurd tensor and metadata counts
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(EngineError) as err:
        load_engine("llamacpp", {"model_path": str(bad)})
    # a load failure or a crash of the child: either way named, and pytest lives on
    assert "could not load" in str(err.value) or "engine child process" in str(err.value)


def test_describe_exit_names_signals_and_codes() -> None:
    assert describe_exit(-11) == "SIGSEGV"
    assert describe_exit(-9).startswith("SIGKILL (kill -9")
    assert describe_exit(3) == "exit code 3"


def test_extra_bufts_are_off_where_amx_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    amx = "flags\t\t: fpu sse avx512f amx_bf16 amx_tile amx_int8 avx512_fp16\n"
    plain = "flags\t\t: fpu sse avx512f avx512_vnni\n"
    assert cpu_amx_flags(amx) == ["amx_bf16", "amx_int8", "amx_tile"]
    off, why = choose_extra_bufts("auto", amx)
    assert not off and "amx_bf16, amx_int8, amx_tile" in why and "#20824" in why
    # a llama.cpp built on an AMX machine (-march=native) has the AMX code even where
    # the CPU it runs on lacks it: off too, and said
    monkeypatch.setattr(llamacpp, "backend_amx", lambda: True)
    off, why = choose_extra_bufts("auto", plain)
    assert not off and "no AMX flags in /proc/cpuinfo" in why and "built: True" in why
    monkeypatch.setattr(llamacpp, "backend_amx", lambda: False)
    on, why = choose_extra_bufts("auto", plain)  # neither the CPU nor the build has AMX
    assert on and why.startswith("auto: no AMX")
    assert choose_extra_bufts(True, amx) == (True, "engine setting extra_bufts=true")
    assert choose_extra_bufts("false", plain) == (False, "engine setting extra_bufts=false")
    with pytest.raises(EngineError, match="extra_bufts='maybe': use auto, true or false"):
        load_engine("llamacpp", {"extra_bufts": "maybe"})


def test_the_extra_bufts_choice_reaches_llama_cpp_and_the_engine_info() -> None:
    engine = load_engine("llamacpp", {"n_threads": 2, "extra_bufts": False})
    try:
        (rec,) = run(engine, [Request("a", PROMPTS[0], 8)])
    finally:
        asyncio.run(engine.aclose())
    assert rec.ok and rec.output_tokens == 8
    assert engine.info.settings["extra_bufts"] is False
    assert engine.info.settings["extra_bufts_why"] == "engine setting extra_bufts=false"


def test_a_hung_child_is_killed_after_a_cancel_and_nothing_waits_for_it(
    engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(child, "STOP_TIMEOUT_S", 2.0)
    pid = engine.child_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # native code stuck in a loop looks like this
    start = time.monotonic()
    (hung,) = run(engine, [Request("a", PROMPTS[0], 8)], timeout_s=1.0)
    assert "time limit" in (hung.error or "") and time.monotonic() - start < 30
    deadline = time.monotonic() + 30
    while engine.child_pid == pid and time.monotonic() < deadline:
        time.sleep(0.1)  # the engine's thread kills it STOP_TIMEOUT_S after the cancel
    (after,) = run(engine, [Request("a", PROMPTS[0], 8)])
    assert after.ok and after.output_tokens == 8 and engine.child_pid != pid


def test_the_server_launcher_takes_its_own_argument_and_passes_the_rest() -> None:
    from pytest_tokperf.engines.llamacpp_server import own_argument

    args = ["--model", "m.gguf", "--extra_bufts", "false", "--port", "8000"]
    assert own_argument(args) == ("false", ["--model", "m.gguf", "--port", "8000"])
    assert own_argument(["--extra_bufts=true", "--n_ctx", "512"]) == ("true", ["--n_ctx", "512"])
    assert own_argument(["--model", "m.gguf"]) == ("auto", ["--model", "m.gguf"])
    for missing in (["--extra_bufts"], ["--extra_bufts", "--port", "8000"]):
        with pytest.raises(SystemExit, match="--extra_bufts needs a value: auto, true or false"):
            own_argument(missing)
    value, _ = own_argument(["--extra_bufts", "maybe"])  # refused as the engine refuses it
    with pytest.raises(EngineError, match="extra_bufts='maybe': use auto, true or false"):
        choose_extra_bufts(value)
