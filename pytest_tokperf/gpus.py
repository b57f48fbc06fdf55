"""GPUs: the NVML inventory, exclusive allocation to this process, and telemetry.

Every NVML call goes through one small seam, `Nvml`: the real `pynvml` module
(PyPI `nvidia-ml-py`, imported lazily) or `RecordedNvml`, a stand-in with the same
function names and return shapes that replays an inventory recorded as JSON. The
code that reads an inventory, allocates and samples is the same for both.

Allocation holds an OS file lock (`fcntl.flock`) per GPU UUID in a lock directory
shared by every process on the machine. The kernel drops a lock when its holder
dies, so a crashed or killed xdist worker frees its GPUs without any clean-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from pytest_tokperf import machine

GIB = 1024**3
ENV_RECORDING = "TOKPERF_NVML_RECORDING"
DEVICE_FILES = "/dev/nvidia[0-9]*"  # the driver's device nodes: there are GPUs here
DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "pytest-tokperf-locks"
SAMPLE_INTERVAL_S = 0.1  # ~10 Hz: fine enough for power, far off the request hot path

# NVML clock event ("throttle") reason bits, as in nvml.h / pynvml
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# A GPU at full load sits at its power limit by design (sw_power_cap), and idle or
# configured clocks say nothing about the run; these reasons mean the hardware
# slowed itself down, so the run's numbers are not what the part can do.
THROTTLED = 0x8 | 0x20 | 0x40 | 0x80


class Nvml(Protocol):
    """The NVML calls this package makes (a subset of `pynvml`, same names)."""

    NVML_CLOCK_SM: int
    NVML_TEMPERATURE_GPU: int
    NVML_NVLINK_MAX_LINKS: int
    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...
    def nvmlSystemGetCudaDriverVersion(self) -> int: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]: ...
    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int: ...
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int: ...
    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock: int) -> int: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...
    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetGpuFabricInfoV(self, handle: Any, info: Any) -> int: ...
    def c_nvmlGpuFabricInfoV_t(self) -> Any: ...  # the struct (ctypes in pynvml)
    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]: ...
    # nvidia-ml-py >= 12.535.77; older releases have only ...ThrottleReasons (deprecated)
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int: ...


# --- inventory ---------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML saw it when the inventory was read."""

    index: int  # NVML's index; CUDA's order may differ, so everything else uses `uuid`
    name: str
    uuid: str
    pci_bus_id: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    mig_enabled: bool
    nvlinks_active: int
    power_limit_w: float | None
    max_sm_clock_mhz: int | None
    processes: tuple[int, ...] = ()  # pids of compute processes running on it
    # NVLink domain (NVL72 racks): all GPUs of one rack share cluster UUID and clique
    fabric_cluster: str | None = None  # clusterUuid's 16 raw bytes, as hex
    fabric_clique: int | None = None
    fabric_state: int | None = None  # 3: registration with the fabric completed
    compute_capability: tuple[int, int] | None = None  # (10, 3) on GB300; None: not reported

    @property
    def memory_gib(self) -> float:
        return self.memory_total / GIB


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    driver: str | None = None
    cuda: str | None = None  # the CUDA version the driver supports, e.g. "12.8"
    error: str | None = None  # why there are no GPUs, when NVML could not be used
    source: str = "nvml"  # or the recording's path
    visible: str | None = None  # the inherited CUDA_VISIBLE_DEVICES these GPUs are limited to
    init_failed: bool = False  # nvmlInit itself failed (no library, no driver, a mismatch)

    def describe(self) -> str:
        """One line for the report header."""
        if not self.gpus:
            return f"no GPUs ({self.error})" if self.error else "no GPUs"
        names: dict[str, int] = {}
        for gpu in self.gpus:
            names[gpu.name] = names.get(gpu.name, 0) + 1
        kinds = ", ".join(f"{n} x {name}" for name, n in names.items())
        versions = f"driver {self.driver}, CUDA {self.cuda}" if self.driver else ""
        origin = "" if self.source == "nvml" else f", recorded in {self.source}"
        if self.visible is not None:
            origin += f", CUDA_VISIBLE_DEVICES={self.visible}"
        return f"{kinds} ({versions}{origin})" if versions or origin else kinds

    def to_json(self) -> dict[str, Any]:
        return {
            "gpus": [
                {
                    **{k: v for k, v in vars(g).items() if k != "processes"},
                    "processes": list(g.processes),
                }
                for g in self.gpus
            ],
            "driver": self.driver,
            "cuda": self.cuda,
            "error": self.error,
            "source": self.source,
            "visible": self.visible,
        }

    def restrict(self, cuda_visible: str | None) -> Inventory:
        """The GPUs an inherited CUDA_VISIBLE_DEVICES (indices or UUIDs) leaves us.

        An outer scheduler (Slurm without device cgroups, a CI runner) hands a job its
        GPUs this way; NVML still sees every GPU of the node. An index is taken as
        NVML's: CUDA's default order is the same (PCI bus order) on a node of one GPU
        model. Like CUDA, the list ends at the first entry that names no GPU.
        """
        if cuda_visible is None or not self.gpus:
            return self
        chosen: list[Gpu] = []
        for entry in cuda_visible.split(","):
            entry = entry.strip()
            if entry.isdigit():
                found = [g for g in self.gpus if g.index == int(entry)]
            else:  # a UUID or a unique prefix of one, as CUDA accepts
                found = [g for g in self.gpus if entry.startswith("GPU-") and
                         g.uuid.startswith(entry)]  # fmt: skip
            if len(found) != 1:
                break
            if found[0] not in chosen:
                chosen.append(found[0])
        error = None
        if not chosen:
            error = f"CUDA_VISIBLE_DEVICES={cuda_visible!r} leaves none of {len(self.gpus)} GPUs"
        return replace(self, gpus=tuple(chosen), error=error, visible=cuda_visible)


def load_nvml() -> tuple[Nvml | None, str | None]:
    """The NVML module to use, or None and why not.

    `TOKPERF_NVML_RECORDING` names a recorded inventory to replay instead of the
    real NVML: how this package tests allocation on machines without GPUs.
    """
    recording = os.environ.get(ENV_RECORDING)
    if recording:
        return RecordedNvml.load(Path(recording)), None
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed: pip install nvidia-ml-py"
    nvml: Nvml = pynvml
    return nvml, None


def _errors(nvml: Nvml) -> tuple[type[Exception], ...]:
    """What an NVML call may raise: `NVMLError`, and `NVMLLibraryMismatchError` (a driver
    lacking a versioned call), which pynvml derives from plain `Exception`."""
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
    return (nvml.NVMLError,) if mismatch is None else (nvml.NVMLError, mismatch)


def _optional(nvml: Nvml, call: Callable[[], Any]) -> Any:
    """A value some GPUs or drivers do not report (NotSupported, mismatch): None then."""
    try:
        return call()
    except _errors(nvml):
        return None


def _text(value: str | bytes) -> str:
    # pynvml returns str, but some struct fields are bytes on older releases
    return value.decode() if isinstance(value, bytes) else value


def _active_links(nvml: Nvml, handle: Any) -> int:
    # a link may report NotSupported in the middle of the range: ask every one
    states = (
        _optional(nvml, functools.partial(nvml.nvmlDeviceGetNvLinkState, handle, link))
        for link in range(nvml.NVML_NVLINK_MAX_LINKS)
    )
    return sum(1 for state in states if state)


def _capability(nvml: Nvml, handle: Any) -> tuple[int, int] | None:
    cc = _optional(nvml, functools.partial(nvml.nvmlDeviceGetCudaComputeCapability, handle))
    return None if cc is None else (int(cc[0]), int(cc[1]))


def _event_reasons(nvml: Nvml, handle: Any) -> int | None:
    call = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if call is None:  # nvidia-ml-py older than 12.535.77
        call = getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
    return None if call is None else _optional(nvml, functools.partial(call, handle))


FABRIC_COMPLETED = 3  # NVML_GPU_FABRIC_STATE_COMPLETED


def fabric(nvml: Nvml, handle: Any) -> tuple[str, int, int] | None:
    """(clusterUuid as hex, cliqueId, state) of a GPU's NVLink fabric, None without one.

    clusterUuid is read as its raw bytes (a uint8 array), never as text; a driver
    without the V call raises NVMLLibraryMismatchError, a plain Exception.
    """
    try:
        info = nvml.c_nvmlGpuFabricInfoV_t()
        ref = ctypes.byref(info) if isinstance(info, ctypes.Structure) else info
        nvml.nvmlDeviceGetGpuFabricInfoV(handle, ref)
    except Exception:  # NotSupported, no such call, or a driver too old for it
        return None
    return bytes(info.clusterUuid).hex(), int(info.cliqueId), int(info.state)


def _cuda_version(raw: int | None) -> str | None:
    # NVML encodes CUDA 12.8 as 12080
    return None if raw is None else f"{raw // 1000}.{raw % 1000 // 10}"


def broken_driver(inventory: Inventory) -> str | None:
    """Why this machine's GPUs cannot be seen although it has some: NVML failed to start
    beside the driver's device files (a driver/library mismatch, a driver half loaded).
    None: NVML works, or there are no NVIDIA devices here."""
    if not inventory.init_failed:
        return None
    nodes = sorted(glob.glob(DEVICE_FILES))
    if not nodes:
        return None
    return (
        f"NVML could not start ({inventory.error}) although this machine has NVIDIA "
        f"devices ({', '.join(nodes[:4])}): fix the driver (nvidia-smi shows the same "
        "error), or pass --tokperf-profile cpu to run on the CPU on purpose"
    )


def read_inventory(nvml: Nvml | None, why_not: str | None = None) -> Inventory:
    """Every GPU NVML sees; no library or no driver is an inventory without GPUs."""
    source = getattr(nvml, "source", "nvml")
    if nvml is None:
        return Inventory((), error=why_not or "NVML is not available")
    try:
        nvml.nvmlInit()
    except _errors(nvml) as exc:
        return Inventory((), error=f"NVML: {exc}", source=source, init_failed=True)
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(h)
            mig = _optional(nvml, functools.partial(nvml.nvmlDeviceGetMigMode, h))
            power = _optional(nvml, functools.partial(nvml.nvmlDeviceGetEnforcedPowerLimit, h))
            clock = _optional(
                nvml, functools.partial(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM)
            )
            procs = _optional(nvml, functools.partial(nvml.nvmlDeviceGetComputeRunningProcesses, h))
            cluster, clique, state = fabric(nvml, h) or (None, None, None)
            gpus.append(
                Gpu(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(h)),
                    uuid=_text(nvml.nvmlDeviceGetUUID(h)),
                    pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(h).busId),
                    memory_total=int(memory.total),
                    memory_free=int(memory.free),
                    mig_enabled=bool(mig and mig[0]),
                    nvlinks_active=_active_links(nvml, h),
                    power_limit_w=None if power is None else power / 1000,
                    max_sm_clock_mhz=clock,
                    processes=tuple(int(p.pid) for p in procs or ()),
                    fabric_cluster=cluster,
                    fabric_clique=clique,
                    fabric_state=state,
                    compute_capability=_capability(nvml, h),
                )
            )
        driver = _optional(nvml, nvml.nvmlSystemGetDriverVersion)
        cuda = _cuda_version(_optional(nvml, nvml.nvmlSystemGetCudaDriverVersion))
        return Inventory(tuple(gpus), _text(driver) if driver else None, cuda, source=source)
    except _errors(nvml) as exc:
        return Inventory((), error=f"NVML: {exc}", source=source)


# --- the recorded stand-in for pynvml ------------------------------------------------


class _RecordedError(Exception):
    pass


class _LibraryNotFound(_RecordedError):
    pass


class _NotSupported(_RecordedError):
    pass


class _LibraryMismatch(Exception):  # as in pynvml: not an NVMLError
    pass


@dataclass
class _Struct:
    """Attribute access like pynvml's ctypes structs (memory.total, pci.busId, ...)."""

    fields: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None


class RecordedNvml:
    """Replays a recorded inventory with pynvml's function names and return shapes.

    The recording is JSON: `{"driver": str, "cuda": int, "init_error": str | null,
    "gpus": [{"name", "uuid", "pci_bus_id", "memory": {"total", "free", "used"},
    "mig_mode": [current, pending], "nvlink_active": int (links 0..n-1 active) or
    "nvlink_states": [1 | 0 | null (NotSupported), ...], "power_limit_mw": int,
    "max_sm_clock_mhz": int, "compute_capability": [major, minor],
    "processes": [{"pid", "usedGpuMemory"}],
    "samples": [{"power_mw", "energy_mj", "sm_clock_mhz", "temperature_c",
    "utilization": {"gpu", "memory"}, "throttle_reasons"}],
    "fabric": {"cluster_uuid": 32 hex digits, "clique_id", "state"}}]}`. A missing key reads
    as NVML's NotSupported. Each telemetry call steps that GPU's value through
    `samples`, holding the last one, as a real counter would be read over time.
    """

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_NVLINK_MAX_LINKS = 18
    NVMLError: type[Exception] = _RecordedError
    NVMLError_LibraryNotFound = _LibraryNotFound
    NVMLError_NotSupported = _NotSupported
    NVMLLibraryMismatchError = _LibraryMismatch

    def __init__(self, recording: Mapping[str, Any], source: str = "recording") -> None:
        self.recording = recording
        self.source = source
        self._gpus: list[Mapping[str, Any]] = list(recording.get("gpus", []))
        self._reads: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()  # the sampler thread reads too

    @classmethod
    def load(cls, path: Path) -> RecordedNvml:
        return cls(json.loads(path.read_text(encoding="utf-8")), source=str(path))

    def _get(self, handle: int, key: str) -> Any:
        gpu = self._gpus[handle]
        if key not in gpu:
            raise _NotSupported(f"{key} is not supported")
        return gpu[key]

    def _sample(self, handle: int, key: str) -> Any:
        samples = self._gpus[handle].get("samples") or []
        if not samples or key not in samples[0]:
            raise _NotSupported(f"{key} is not supported")
        with self._lock:
            n = self._reads.get((handle, key), 0)
            self._reads[(handle, key)] = n + 1
        return samples[min(n, len(samples) - 1)][key]

    def nvmlInit(self) -> None:
        if self.recording.get("init_error"):
            raise _LibraryNotFound(self.recording["init_error"])

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self.recording["driver"])

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return int(self.recording["cuda"])

    def nvmlDeviceGetCount(self) -> int:
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for index, gpu in enumerate(self._gpus):
            if gpu["uuid"] == uuid:
                return index
        raise _RecordedError(f"no GPU with UUID {uuid}")

    def nvmlDeviceGetName(self, handle: int) -> str:
        return str(self._get(handle, "name"))

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return str(self._get(handle, "uuid"))

    def nvmlDeviceGetPciInfo(self, handle: int) -> _Struct:
        return _Struct({"busId": self._get(handle, "pci_bus_id")})

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Struct:
        return _Struct(dict(self._get(handle, "memory")))

    def nvmlDeviceGetMigMode(self, handle: int) -> list[int]:
        return list(self._get(handle, "mig_mode"))

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        if link >= self.NVML_NVLINK_MAX_LINKS:
            raise _RecordedError("invalid argument")
        states = self._gpus[handle].get("nvlink_states")
        if states is not None:  # per link: 1, 0, or null for NotSupported
            if link >= len(states) or states[link] is None:
                raise _NotSupported("link is not supported")
            return int(states[link])
        active = int(self._get(handle, "nvlink_active"))
        return 1 if link < active else 0

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return int(self._get(handle, "power_limit_mw"))

    def nvmlDeviceGetMaxClockInfo(self, handle: int, clock: int) -> int:
        return int(self._get(handle, "max_sm_clock_mhz"))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Struct]:
        return [_Struct(dict(p)) for p in self._gpus[handle].get("processes", [])]

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return int(self._sample(handle, "power_mw"))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return int(self._sample(handle, "energy_mj"))

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        return int(self._sample(handle, "sm_clock_mhz"))

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return int(self._sample(handle, "temperature_c"))

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Struct:
        return _Struct(dict(self._sample(handle, "utilization")))

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        major, minor = self._get(handle, "compute_capability")
        return int(major), int(minor)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return int(self._sample(handle, "throttle_reasons"))

    class c_nvmlGpuFabricInfoV_t:  # pynvml's name
        clusterUuid: bytes = b""
        cliqueId: int = 0
        state: int = 0

    def nvmlDeviceGetGpuFabricInfoV(self, handle: int, info: Any) -> int:
        recorded = self._get(handle, "fabric")
        info.clusterUuid = bytes.fromhex(recorded["cluster_uuid"])
        info.cliqueId = int(recorded["clique_id"])
        info.state = int(recorded["state"])
        return 0


# --- allocation --------------------------------------------------------------------


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


# --- telemetry ---------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU; None where the GPU does not report the value."""

    t_ns: int
    power_w: float | None
    energy_j: float | None  # NVML's counter since the driver loaded
    sm_clock_mhz: int | None
    temperature_c: int | None
    utilization_pct: int | None
    throttle_reasons: int = 0  # NVML's bit mask


@dataclass(frozen=True)
class GpuTelemetry:
    """The allocated GPUs over one measured run, summed or worst over GPUs."""

    gpus: int
    samples: int  # readings per GPU
    window_s: float
    energy_j: float | None  # all GPUs, from the energy counters
    mean_power_w: float | None  # all GPUs: energy / window, else the mean of readings
    max_power_w: float | None  # the highest single GPU reading
    max_temperature_c: int | None
    min_sm_clock_mhz: int | None
    mean_sm_clock_mhz: float | None
    mean_utilization_pct: float | None
    throttle_reasons: tuple[str, ...]  # every reason seen in any reading
    throttled: bool  # a reason in THROTTLED was seen: the run was slowed by the hardware
    # other processes' compute work on the allocated GPUs at the run's start or end
    # (pids outside this run's process tree): a co-tenant
    cotenants: tuple[int, ...] = ()


@dataclass(frozen=True)
class CpuTelemetry:
    """What the OS says about this process over the run: is the client saturated?"""

    wall_s: float
    cpu_s: float  # user + system time of this process and its waited-for children
    cores: int  # cores this process may run on
    load_1m: float | None  # the system's 1-minute load average at the end
    # cores the machine's other processes (outside this run's process tree) kept busy
    # on average, and cores the hypervisor stole (machine.py); None: not measured
    others_cores: float | None = None
    steal_cores: float | None = None
    machine_cores: int | None = None

    @property
    def busy_machine(self) -> bool:
        """Others took enough of the machine to make the run's numbers partly theirs."""
        if self.others_cores is None or self.steal_cores is None or self.wall_s < 1.0:
            return False  # a blink of a run: its shares are start-up noise
        return machine.busy(self.others_cores, self.steal_cores, self.machine_cores or 1)

    @property
    def busy_cores(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class Telemetry:
    cpu: CpuTelemetry
    gpu: GpuTelemetry | None = None


def reasons(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in THROTTLE_REASONS.items() if mask & bit)


def _values(samples: Sequence[GpuSample], key: str) -> list[float]:
    return [v for s in samples if (v := getattr(s, key)) is not None]


def summarize_gpus(per_gpu: Mapping[str, Sequence[GpuSample]]) -> GpuTelemetry | None:
    """Pure: the run's GPU numbers from each GPU's readings (first and last bound the run)."""
    series = [s for s in per_gpu.values() if s]
    if not series:
        return None
    window_ns = max(s[-1].t_ns for s in series) - min(s[0].t_ns for s in series)
    window_s = window_ns / 1e9
    firsts = [s[0].energy_j for s in series]
    lasts = [s[-1].energy_j for s in series]
    energy: float | None = None
    if all(e is not None for e in firsts + lasts):
        energy = sum(
            b - a for a, b in zip(firsts, lasts, strict=True) if a is not None and b is not None
        )
    powers = [_values(s, "power_w") for s in series]
    if energy is not None and window_s > 0:
        mean_power: float | None = energy / window_s
    elif all(powers):
        mean_power = sum(sum(p) / len(p) for p in powers)
    else:
        mean_power = None
    every = [x for s in series for x in s]
    clocks = _values(every, "sm_clock_mhz")
    temps = _values(every, "temperature_c")
    utils = _values(every, "utilization_pct")
    mask = 0
    for sample in every:
        mask |= sample.throttle_reasons
    return GpuTelemetry(
        gpus=len(series),
        samples=min(len(s) for s in series),
        window_s=window_s,
        energy_j=energy,
        mean_power_w=mean_power,
        max_power_w=max((p for ps in powers for p in ps), default=None),
        max_temperature_c=int(max(temps)) if temps else None,
        min_sm_clock_mhz=int(min(clocks)) if clocks else None,
        mean_sm_clock_mhz=sum(clocks) / len(clocks) if clocks else None,
        mean_utilization_pct=sum(utils) / len(utils) if utils else None,
        throttle_reasons=reasons(mask),
        throttled=bool(mask & THROTTLED),
    )


def read_sample(
    nvml: Nvml, handle: Any, clock: Callable[[], int] = time.perf_counter_ns
) -> GpuSample:
    """One reading of every telemetry value of one GPU."""
    power = _optional(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    energy = _optional(nvml, lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    util = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    mask = _event_reasons(nvml, handle)
    return GpuSample(
        t_ns=clock(),
        power_w=None if power is None else power / 1000,  # NVML: mW
        energy_j=None if energy is None else energy / 1000,  # NVML: mJ
        sm_clock_mhz=_optional(
            nvml, lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)
        ),
        temperature_c=_optional(
            nvml, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        ),
        utilization_pct=None if util is None else int(util.gpu),
        throttle_reasons=int(mask or 0),
    )


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Sampler:
    """Reads the allocated GPUs about 10 times a second on its own thread.

    The first and last readings are taken on entry and exit, in the caller's thread,
    so the energy counters bound exactly the measured run however short it is.
    """

    def __init__(
        self,
        nvml: Nvml | None,
        uuids: Sequence[str],
        interval_s: float = SAMPLE_INTERVAL_S,
        root: int | None = None,
    ) -> None:
        self._nvml = nvml
        self._handles: dict[str, Any] = {}
        if nvml is not None:
            self._handles = {u: nvml.nvmlDeviceGetHandleByUUID(u) for u in uuids}
        self._interval = interval_s
        self._samples: dict[str, list[GpuSample]] = {u: [] for u in self._handles}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu0 = self._cpu1 = 0.0
        self._t0 = self._t1 = 0
        self._machine: list[machine.Reading | None] = []
        self.root = root  # the process whose tree is this run's own (None: this one)
        self._cotenants: tuple[int, ...] = ()

    def _read_all(self) -> None:
        assert self._nvml is not None
        for uuid, handle in self._handles.items():
            self._samples[uuid].append(read_sample(self._nvml, handle))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._read_all()

    def __enter__(self) -> Sampler:
        self._machine = [machine.read(self.root)]  # before the clock starts: it walks /proc
        self._t0, self._cpu0 = time.perf_counter_ns(), _cpu_seconds()
        if self._handles:
            self._read_all()
            self._thread = threading.Thread(
                target=self._loop, name="tokperf-telemetry", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._read_all()
        self._t1, self._cpu1 = time.perf_counter_ns(), _cpu_seconds()
        self._machine.append(machine.read(self.root))
        self._cotenants = self._others_on_gpus()

    def _others_on_gpus(self) -> tuple[int, ...]:
        """Compute processes on the allocated GPUs that are not this run's own."""
        ours = frozenset().union(*(r.tree_pids for r in self._machine if r is not None))
        seen: set[int] = set()
        for handle in self._handles.values():
            assert self._nvml is not None
            procs = _optional(
                self._nvml, functools.partial(self._nvml.nvmlDeviceGetComputeRunningProcesses,
                                              handle)
            )  # fmt: skip
            seen |= {int(p.pid) for p in procs or ()}
        return tuple(sorted(seen - ours)) if ours else ()

    def summary(self) -> Telemetry:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        wall = (self._t1 - self._t0) / 1e9
        start, end = [*self._machine, None, None][:2]
        measured = start is not None and end is not None
        others, steal = machine.others(start, end, wall)
        cpu = CpuTelemetry(
            wall_s=wall,
            cpu_s=self._cpu1 - self._cpu0,
            cores=_cores(),
            load_1m=load,
            others_cores=others if measured else None,
            steal_cores=steal if measured else None,
            machine_cores=os.cpu_count(),
        )
        gpu = summarize_gpus(self._samples)
        if gpu is not None and self._cotenants:
            gpu = replace(gpu, cotenants=self._cotenants)
        return Telemetry(cpu, gpu)


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
