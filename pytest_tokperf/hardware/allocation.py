"""Exclusive allocation of GPUs to this process, and CUDA_VISIBLE_DEVICES for them.

Allocation holds an OS file lock (`fcntl.flock`) per GPU UUID in a lock directory
shared by every process on the machine. The kernel drops a lock when its holder
dies, so a crashed or killed xdist worker frees its GPUs without any clean-up.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pytest_tokperf.hardware.inventory import Gpu, Inventory

DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "pytest-tokperf-locks"


@dataclass(frozen=True)
class Need:
    """What a profile asks of the hardware."""

    profile: str
    count: int
    name_pattern: str = ""  # a regular expression searched in the NVML name, any case
    min_memory_gib: float = 0.0
    compute_capability: tuple[int, int] | None = None  # checked where NVML reports it

    def describe(self) -> str:
        gpus = "GPU" if self.count == 1 else "GPUs"
        what = f"{gpus} matching {self.name_pattern!r}" if self.name_pattern else gpus
        memory = f" with at least {self.min_memory_gib:g} GiB" if self.min_memory_gib else ""
        cc = self.compute_capability
        capability = f", compute capability {cc[0]}.{cc[1]}" if cc else ""
        return f"{self.count} {what}{memory}{capability}"


class Shortage(Exception):
    """Not enough suitable free GPUs; the message names what is missing and why."""


def unsuitable(gpu: Gpu, need: Need, allow_busy: bool, own_pids: Sequence[int] = ()) -> str | None:
    """Why `gpu` cannot serve `need`, or None when it can."""
    if need.name_pattern and not re.search(need.name_pattern, gpu.name, re.IGNORECASE):
        return f"{gpu.name} does not match {need.name_pattern!r}"
    if gpu.memory_gib < need.min_memory_gib:
        return f"{gpu.memory_gib:.0f} GiB < {need.min_memory_gib:g} GiB"
    want, got = need.compute_capability, gpu.compute_capability
    if want is not None and got is not None and want != got:
        # NVML's names for new parts are not verified: the architecture must agree too
        return f"compute capability {got[0]}.{got[1]}, not {want[0]}.{want[1]}"
    if gpu.mig_enabled:
        # a MIG GPU is only usable by its MIG instances' UUIDs, never as a whole
        return "MIG mode is enabled"
    foreign = [p for p in gpu.processes if p not in own_pids]
    if foreign and not allow_busy:
        pids = ", ".join(str(p) for p in foreign)
        return (
            f"busy with foreign compute processes (pid {pids}); --tokperf-allow-busy-gpus uses it"
        )
    return None


def choose(
    inventory: Inventory, need: Need, allow_busy: bool, own_pids: Sequence[int] = ()
) -> tuple[list[Gpu], list[tuple[Gpu, str]]]:
    """The GPUs that could serve `need` (NVML order), and the others with the reason."""
    fit: list[Gpu] = []
    rejected: list[tuple[Gpu, str]] = []
    for gpu in inventory.gpus:
        why = unsuitable(gpu, need, allow_busy, own_pids)
        if why is None:
            fit.append(gpu)
        else:
            rejected.append((gpu, why))
    return fit, rejected


@dataclass
class GpuLock:
    """An exclusive flock on one GPU's lock file, held while the fd is open."""

    uuid: str
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last fd drops the flock
            self.fd = -1


def _lock_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    # every user's runs share the directory, like /tmp itself; someone else's
    # directory already has the mode it needs, and only its owner may change it
    with contextlib.suppress(OSError):
        os.chmod(path, 0o1777)
    return path


def _open_lock(path: Path) -> tuple[int, bool]:
    """A descriptor to flock `path` with, and whether it may be written."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's file: a read-only fd locks just as well
        return os.open(path, os.O_RDONLY), False
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # past the umask: other users' runs lock it too
    return fd, True


def try_lock(lock_dir: Path, uuid: str) -> GpuLock | None:
    """Take `uuid`'s lock without waiting; None when another process holds it."""
    import fcntl

    path = _lock_dir(lock_dir) / f"{uuid}.lock"
    fd, writable = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if writable:
        # who holds it, for other processes' skip messages; the lock is the flock itself
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {socket.gethostname()} {worker}".strip().encode(), 0)
    return GpuLock(uuid, path, fd)


def holder(lock_dir: Path, uuid: str) -> str:
    try:
        return (lock_dir / f"{uuid}.lock").read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


@dataclass
class Allocation:
    """The GPUs this process holds (none for the cpu profile), and their locks."""

    gpus: tuple[Gpu, ...] = ()
    locks: tuple[GpuLock, ...] = field(default=(), repr=False)

    @property
    def devices(self) -> int:
        """Devices an engine is given: the GPUs, or the one CPU device."""
        return len(self.gpus) or 1

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(g.uuid for g in self.gpus)

    @property
    def fds(self) -> tuple[int, ...]:
        """The lock descriptors: a process that inherits them holds the GPUs too."""
        return tuple(lock.fd for lock in self.locks if lock.fd >= 0)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.uuids)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()


def allocate(
    inventory: Inventory,
    need: Need,
    lock_dir: Path,
    allow_busy: bool,
    wait_s: float = 0.0,
    poll_s: float = 0.25,
) -> Allocation:
    """Lock `need.count` suitable GPUs for this process, or raise `Shortage` saying why.

    All or none, in UUID order: processes that each need several GPUs never end up
    each holding a part and all falling short. While others hold them, it tries again
    until `wait_s` seconds have passed.
    """
    fit, rejected = choose(inventory, need, allow_busy, own_pids=(os.getpid(),))
    fit.sort(key=lambda g: g.uuid)
    deadline = time.monotonic() + wait_s
    while True:
        locks, held = _lock_all(fit, need.count, lock_dir)
        if locks:
            by_uuid = {g.uuid: g for g in fit}
            return Allocation(tuple(by_uuid[lock.uuid] for lock in locks), tuple(locks))
        if len(fit) < need.count or time.monotonic() >= deadline:  # waiting cannot help
            raise Shortage(_shortage(inventory, need, fit, rejected, held, lock_dir))
        time.sleep(poll_s)


def _lock_all(fit: Sequence[Gpu], count: int, lock_dir: Path) -> tuple[list[GpuLock], list[str]]:
    """`count` locks of `fit` or none, and the GPUs others held; one process at a time."""
    import fcntl

    locks: list[GpuLock] = []
    held: list[str] = []
    # one attempt at a time on the machine: two attempts never split the free GPUs
    mutex, _ = _open_lock(_lock_dir(lock_dir) / "allocate.lock")
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)
        for gpu in fit:
            if len(locks) == count:
                break
            lock = try_lock(lock_dir, gpu.uuid)
            if lock is None:
                held.append(f"GPU {gpu.index} {gpu.uuid} ({holder(lock_dir, gpu.uuid)})")
            else:
                locks.append(lock)
        if len(locks) < count:
            for lock in locks:
                lock.release()
            locks = []
    finally:
        os.close(mutex)
    return locks, held


def _shortage(
    inventory: Inventory,
    need: Need,
    fit: Sequence[Gpu],
    rejected: Sequence[tuple[Gpu, str]],
    held: Sequence[str],
    lock_dir: Path,
) -> str:
    head = f"profile {need.profile} needs {need.describe()}"
    if not inventory.gpus:
        return f"{head}; this machine has {inventory.describe()}"
    parts = [f"{len(fit)} of {len(inventory.gpus)} GPUs here are suitable"]
    parts += [f"GPU {g.index} {g.uuid}: {why}" for g, why in rejected[:8]]
    if len(rejected) > 8:
        parts.append(f"... and {len(rejected) - 8} more unsuitable")
    if held:
        parts.append(f"held by other tokperf processes (locks in {lock_dir}): {'; '.join(held)}")
    return f"{head}; {'; '.join(parts)}"


@contextmanager
def cuda_visible(allocation: Allocation) -> Iterator[None]:
    """Set CUDA_VISIBLE_DEVICES to the allocation's UUIDs (restored on exit)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if allocation.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = allocation.cuda_visible_devices
    try:
        yield
    finally:
        if allocation.gpus:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before
