"""Allocation across real processes: OS file locks, and a holder killed with SIGKILL.

Each holder is a separate Python process that allocates GPUs from the recorded
8-GPU H100 box, prints the UUIDs it got and holds them until its stdin closes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent.parent / "data" / "nvml"
HOLDER = """
import pathlib, sys
from pytest_tokperf.gpus import Need, RecordedNvml, Shortage, allocate, read_inventory

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
