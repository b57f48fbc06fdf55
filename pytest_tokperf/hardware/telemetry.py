"""Telemetry of a measured run: the allocated GPUs' power, clocks and throttling, and
what the OS says about this process and the machine's other processes.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pytest_tokperf import machine
from pytest_tokperf.hardware.inventory import Nvml, _optional

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


def _event_reasons(nvml: Nvml, handle: Any) -> int | None:
    call = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if call is None:  # nvidia-ml-py older than 12.535.77
        call = getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
    return None if call is None else _optional(nvml, functools.partial(call, handle))


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
