"""What else the machine ran during a measured run: other processes' CPU, and steal.

Read from Linux's /proc at the run's start and end (never during it): the machine's
busy and stolen CPU time (/proc/stat) and this run's own process tree (the pytest
process, or for an xdist worker or an MPI rank its parent's tree, so that the sibling
workers and ranks the session planned for count as its own), each process's time including the
children it waited for (/proc/PID/stat utime, stime, cutime, cstime). What the machine
did beyond the tree was done by others: a noisy neighbour. On other systems nothing
is read and nothing is judged.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# others using more than this many cores on average (and this share of the machine)
# make a run busy: its numbers are partly the neighbour's
BUSY_CORES = 0.5
BUSY_SHARE = 0.25


@dataclass(frozen=True)
class Reading:
    busy_ticks: int  # the machine's non-idle, non-steal CPU time since boot
    steal_ticks: int  # time the hypervisor gave this VM's CPUs to someone else
    tree_ticks: int  # this run's process tree (and the children it reaped)
    tree_pids: frozenset[int] = frozenset()  # its processes (a GPU's may be only these)


def tree_root(shared: bool) -> int:
    """The process whose descendants are this run's own: this one, or its parent when
    it `shared` the machine on purpose with its siblings (an xdist worker, an MPI rank:
    the session planned for them)."""
    return os.getppid() if shared else os.getpid()


def _stat_fields(pid: str) -> list[str] | None:
    """/proc/PID/stat after the command's parentheses (which may hold spaces)."""
    try:
        text = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _tree(root: int) -> tuple[int, frozenset[int]]:
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is None or len(fields) < 15:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        # utime, stime, cutime, cstime: fields 14-17 of stat, 12-15 after the command
        ticks[pid] = sum(int(v) for v in fields[11:15])
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        seen.add(pid)
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total, frozenset(seen)


def read(root: int | None = None) -> Reading | None:
    """The machine's and this run's (the tree under `root`, default this process) CPU
    time now (None: no /proc to read)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        cpu = (PROC / "stat").read_text().splitlines()[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in cpu[1:9])
        ticks, pids = _tree(os.getpid() if root is None else root)
        return Reading(user + nice + system + irq + softirq, steal, ticks, pids)
    return None


def others(start: Reading | None, end: Reading | None, wall_s: float) -> tuple[float, float]:
    """(cores other processes kept busy on average, cores stolen) between two readings."""
    if start is None or end is None or wall_s <= 0:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    busy = (end.busy_ticks - start.busy_ticks) - (end.tree_ticks - start.tree_ticks)
    steal = end.steal_ticks - start.steal_ticks
    return max(0.0, busy / tick / wall_s), max(0.0, steal / tick / wall_s)


def busy(others_cores: float, steal_cores: float, cores: int) -> bool:
    """Others (and the hypervisor) took enough of the machine to slow the run down."""
    taken = others_cores + steal_cores
    return taken > max(BUSY_CORES, BUSY_SHARE * cores)
