"""Allocation across real processes: OS file locks, a holder killed with SIGKILL, and
processes competing for the same GPUs (all or none, waiting with --tokperf-gpu-wait).

Each holder is a separate Python process that allocates GPUs from the recorded
8-GPU H100 box, prints the UUIDs it got and holds them until its stdin closes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent.parent / "data" / "nvml"
HOLDER = """
import pathlib, sys
from pytest_tokperf.hardware.allocation import Need, Shortage, allocate
from pytest_tokperf.hardware.inventory import read_inventory
from pytest_tokperf.hardware.recorded import RecordedNvml

inventory = read_inventory(RecordedNvml.load(pathlib.Path(sys.argv[1])))
try:
    allocation = allocate(inventory, Need("h100-sxm", int(sys.argv[3]), "H100"),
                          pathlib.Path(sys.argv[2]), allow_busy=False)
except Shortage as exc:
    print("SHORT " + str(exc), flush=True)
    sys.exit(3)
print(",".join(allocation.uuids), flush=True)
sys.stdin.read()  # hold the locks until the test closes stdin, or kills this process
"""


def holder(lock_dir: Path, count: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(DATA / "h100-sxm-8.json"), str(lock_dir), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_processes_get_disjoint_gpus_and_a_killed_one_frees_its_own(tmp_path: Path) -> None:
    a, a_uuids = holder(tmp_path, 4)
    b, b_uuids = holder(tmp_path, 4)
    try:
        got_a, got_b = set(a_uuids.split(",")), set(b_uuids.split(","))
        assert len(got_a) == len(got_b) == 4
        assert got_a.isdisjoint(got_b)

        c, line = holder(tmp_path, 1)  # all 8 are held now
        assert c.wait(timeout=60) == 3
        assert line.startswith("SHORT profile h100-sxm needs 1 GPU ")
        assert f"pid {a.pid}" in line and f"pid {b.pid}" in line

        a.send_signal(signal.SIGKILL)  # no clean-up code runs in a killed process
        assert a.wait(timeout=60) == -signal.SIGKILL
        d, d_uuids = holder(tmp_path, 4)
        try:
            assert set(d_uuids.split(",")) == got_a  # the kernel dropped a's locks
        finally:
            release(d)
    finally:
        if a.poll() is None:
            a.kill()
        release(b)


# two processes that each need 2 of the 3 GPUs a CUDA_VISIBLE_DEVICES=0,1,2 parent left
PAIR = """
import os, pathlib, sys
from pytest_tokperf.hardware.allocation import Need, Shortage, allocate
from pytest_tokperf.hardware.inventory import read_inventory
from pytest_tokperf.hardware.recorded import RecordedNvml

inventory = read_inventory(RecordedNvml.load(pathlib.Path(sys.argv[1])))
inventory = inventory.restrict(os.environ["CUDA_VISIBLE_DEVICES"])
sys.stdin.readline()  # start together
try:
    allocation = allocate(inventory, Need("h200", 2, "H200"), pathlib.Path(sys.argv[2]),
                          allow_busy=False, wait_s=float(sys.argv[3]), poll_s=0.05)
except Shortage as exc:
    print("SHORT " + str(exc), flush=True)
    sys.exit(3)
print(",".join(allocation.uuids), flush=True)
sys.stdin.read()  # hold the locks until the test closes stdin
"""


def _pair(lock_dir: Path, wait_s: float) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PAIR, str(DATA / "h200-8.json"), str(lock_dir), str(wait_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    for proc in procs:  # both are past their imports before either allocates
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return procs


def _first_line(procs: list[subprocess.Popen[str]], timeout_s: float) -> dict[int, str]:
    """The lines the processes print within `timeout_s`, by index."""
    streams = {proc.stdout: i for i, proc in enumerate(procs) if proc.stdout is not None}
    ready, _, _ = select.select(list(streams), [], [], timeout_s)
    return {streams[s]: s.readline().strip() for s in ready}


VISIBLE = [u["uuid"] for u in json.loads((DATA / "h200-8.json").read_text())["gpus"][:3]]


def test_two_processes_racing_for_2_of_3_gpus_one_wins_the_other_skips(tmp_path: Path) -> None:
    procs = _pair(tmp_path, wait_s=0)
    try:
        lines = sorted(p.stdout.readline().strip() for p in procs if p.stdout)
        won, lost = lines[0], lines[1]  # "GPU-..." sorts before "SHORT ..."
        assert won.split(",") == sorted(VISIBLE)[:2]  # UUID order, within the visible three
        assert lost.startswith("SHORT profile h200 needs 2 GPUs matching 'H200'; 3 of 3 GPUs")
        assert "held by other tokperf processes" in lost
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=60)
    assert sorted(p.returncode for p in procs) == [0, 3]


def test_a_waiting_process_gets_the_gpus_once_the_holder_lets_go(tmp_path: Path) -> None:
    procs = _pair(tmp_path, wait_s=120)
    try:
        first = _first_line(procs, timeout_s=120)
        assert len(first) == 1  # the other cannot take 2 of 3 while one holds 2
        ((winner, uuids),) = first.items()
        loser = 1 - winner
        assert uuids.split(",") == sorted(VISIBLE)[:2]
        assert _first_line([procs[loser]], timeout_s=0.5) == {}  # still waiting, not skipped
        assert procs[loser].poll() is None
        assert procs[winner].stdin is not None
        procs[winner].stdin.close()
        assert procs[winner].wait(timeout=60) == 0
        assert procs[loser].stdout is not None
        assert procs[loser].stdout.readline().strip().split(",") == sorted(VISIBLE)[:2]
    finally:
        for proc in procs:
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
            proc.wait(timeout=60)
    assert [p.returncode for p in procs] == [0, 0]
