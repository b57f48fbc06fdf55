"""The real NVML on a machine with NVIDIA GPUs (marked `gpu`; skipped elsewhere)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_tokperf.hardware.allocation import Need, allocate
from pytest_tokperf.hardware.inventory import load_nvml, read_inventory
from pytest_tokperf.hardware.telemetry import Sampler

pytestmark = pytest.mark.gpu


def test_inventory_reads_every_gpu() -> None:
    nvml, _ = load_nvml()
    inventory = read_inventory(nvml)
    assert inventory.gpus, inventory.describe()
    assert inventory.driver and inventory.cuda
    for gpu in inventory.gpus:
        assert gpu.uuid.startswith(("GPU-", "MIG-")) and gpu.memory_total > 0
        assert gpu.memory_free <= gpu.memory_total


def test_one_gpu_is_allocated_once_and_sampled(tmp_path: Path) -> None:
    nvml, _ = load_nvml()
    inventory = read_inventory(nvml)
    need = Need("any", 1)
    allocation = allocate(inventory, need, tmp_path, allow_busy=True)
    try:
        others = [g for g in inventory.gpus if g.uuid not in allocation.uuids]
        assert len(others) == len(inventory.gpus) - 1
        with Sampler(nvml, allocation.uuids) as sampler:
            time.sleep(0.5)  # idle: the counters still move, the thread takes readings
        gpu = sampler.summary().gpu
        assert gpu is not None and gpu.samples >= 2
        assert gpu.energy_j is None or gpu.energy_j >= 0
        assert gpu.mean_power_w is None or gpu.mean_power_w > 0
    finally:
        allocation.release()


def test_compute_capability_is_reported_and_an_h200_is_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pytest_tokperf.profiles import BUILTIN, select

    inventory = read_inventory(load_nvml()[0])
    for gpu in inventory.gpus:
        assert gpu.compute_capability is not None and gpu.compute_capability >= (7, 0)
    if not all("H200" in gpu.name for gpu in inventory.gpus):
        pytest.skip(f"not an H200 machine: {inventory.describe()}")
    monkeypatch.delenv("TOKPERF_PROFILE", raising=False)
    profile, source = select(None, "", None, BUILTIN, inventory)
    assert profile.name == "h200" and source.startswith(f"detected: {len(inventory.gpus)} x ")
