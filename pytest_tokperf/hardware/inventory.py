"""The NVML inventory: which GPUs this machine has, as NVML sees them.

Every NVML call of the `hardware` wing goes through one small seam, `Nvml`: the real
`pynvml` module (PyPI `nvidia-ml-py`, imported lazily) or `RecordedNvml`
(`recorded.py`), a stand-in with the same function names and return shapes that
replays an inventory recorded as JSON. The code that reads an inventory, allocates
and samples is the same for both.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from pytest_tokperf.hardware.recorded import RecordedNvml

GIB = 1024**3
ENV_RECORDING = "TOKPERF_NVML_RECORDING"
DEVICE_FILES = "/dev/nvidia[0-9]*"  # the driver's device nodes: there are GPUs here


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
