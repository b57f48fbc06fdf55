"""The hardware wing: NVML inventory, exclusive GPU allocation, run telemetry.

- `inventory`: the `Nvml` seam, `Gpu`, `Inventory`, `read_inventory`, `load_nvml`.
- `recorded`: `RecordedNvml`, a recorded NVML that the tests and `TOKPERF_NVML_RECORDING`
  replay on machines without GPUs.
- `allocation`: `Need`, `allocate` (one OS file lock per GPU), `Allocation`,
  `cuda_visible`.
- `telemetry`: `Sampler`, which reads the allocated GPUs and the OS over a run, and
  the pure `summarize_gpus`.

The names callers use are re-exported here, so `hardware.Sampler` is the same object
as `hardware.telemetry.Sampler`; a test that patches a module's global patches it in
the module that reads it (e.g. `hardware.inventory.DEVICE_FILES`).
"""

from __future__ import annotations

from pytest_tokperf.hardware.allocation import (
    DEFAULT_LOCK_DIR,
    Allocation,
    GpuLock,
    Need,
    Shortage,
    allocate,
    choose,
    cuda_visible,
    try_lock,
    unsuitable,
)
from pytest_tokperf.hardware.inventory import (
    ENV_RECORDING,
    Gpu,
    Inventory,
    Nvml,
    broken_driver,
    load_nvml,
    read_inventory,
)
from pytest_tokperf.hardware.recorded import RecordedNvml
from pytest_tokperf.hardware.telemetry import (
    CpuTelemetry,
    GpuSample,
    GpuTelemetry,
    Sampler,
    Telemetry,
    read_sample,
    summarize_gpus,
)

__all__ = [
    "DEFAULT_LOCK_DIR",
    "ENV_RECORDING",
    "Allocation",
    "CpuTelemetry",
    "Gpu",
    "GpuLock",
    "GpuSample",
    "GpuTelemetry",
    "Inventory",
    "Need",
    "Nvml",
    "RecordedNvml",
    "Sampler",
    "Shortage",
    "Telemetry",
    "allocate",
    "broken_driver",
    "choose",
    "cuda_visible",
    "load_nvml",
    "read_inventory",
    "read_sample",
    "summarize_gpus",
    "try_lock",
    "unsuitable",
]
