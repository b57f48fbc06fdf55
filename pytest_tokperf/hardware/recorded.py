"""A recorded NVML: `RecordedNvml` replays an inventory recorded as JSON.

It has pynvml's function names and return shapes, so the inventory, allocation and
telemetry code runs unchanged against it: how this package tests GPU code on machines
without GPUs (`TOKPERF_NVML_RECORDING` names the recording).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
