"""Inventory, allocation and telemetry on recorded NVML inventories (no GPU needed).

The recordings in tests/data/nvml replay through `RecordedNvml`, which has pynvml's
function names and return shapes, so the code under test is the code that runs on a
real machine. Locks are real OS file locks in a temporary directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pytest_tokperf.hardware.allocation import (
    Allocation,
    Need,
    Shortage,
    allocate,
    choose,
    cuda_visible,
)
from pytest_tokperf.hardware.inventory import Inventory, read_inventory
from pytest_tokperf.hardware.recorded import RecordedNvml
from pytest_tokperf.hardware.telemetry import GpuSample, Sampler, read_sample, summarize_gpus

DATA = Path(__file__).parent.parent / "data" / "nvml"
H100 = Need("h100-sxm", 8, r"H100.*(SXM|HBM3)", 70)


def recorded(name: str) -> RecordedNvml:
    return RecordedNvml.load(DATA / name)


def inventory(name: str) -> Inventory:
    return read_inventory(recorded(name))


def raw(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_inventory_of_an_h100_box_reads_every_field() -> None:
    inv = inventory("h100-sxm-8.json")
    doc = raw("h100-sxm-8.json")
    assert len(inv.gpus) == 8
    assert [g.uuid for g in inv.gpus] == [g["uuid"] for g in doc["gpus"]]
    first = inv.gpus[0]
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert first.pci_bus_id == "00000000:18:00.0"
    assert first.memory_total == doc["gpus"][0]["memory"]["total"]
    assert first.memory_free == doc["gpus"][0]["memory"]["free"]
    assert first.nvlinks_active == 18
    assert first.power_limit_w == 700.0  # 700,000 mW
    assert first.max_sm_clock_mhz == 1980
    assert not first.mig_enabled and first.processes == ()
    assert (inv.driver, inv.cuda) == ("570.86.15", "12.8")  # NVML's 12080
    assert inv.describe().startswith("8 x NVIDIA H100 80GB HBM3 (driver 570.86.15, CUDA 12.8")


def test_no_driver_is_no_gpus_with_the_reason() -> None:
    inv = inventory("no-driver.json")
    assert inv.gpus == ()
    assert inv.describe() == "no GPUs (NVML: NVML Shared Library Not Found)"
    assert read_inventory(None, "nvidia-ml-py is not installed").describe() == (
        "no GPUs (nvidia-ml-py is not installed)"
    )


def test_the_real_nvml_here_raises_library_not_found_and_becomes_no_gpus() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        inv = read_inventory(pynvml)
        assert inv.gpus == () and inv.error is not None and inv.error.startswith("NVML: ")
    else:  # pragma: no cover - a machine with a driver
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver; tests/gpu covers it")


def test_mig_and_foreign_processes_make_a_gpu_unsuitable() -> None:
    need = Need("h100-sxm", 1, "H100", 70)
    fit, rejected = choose(inventory("h100-mig.json"), need, allow_busy=False)
    assert [g.index for g in fit] == [1]
    assert [(g.index, why) for g, why in rejected] == [(0, "MIG mode is enabled")]

    busy = inventory("h100-busy.json")
    fit, rejected = choose(busy, need, allow_busy=False)
    assert [g.index for g in fit] == [1]
    ((gpu, why),) = rejected
    assert gpu.processes == (4242,) and "foreign compute processes (pid 4242)" in why
    # allowed when asked, and a process of our own is never foreign
    assert len(choose(busy, need, allow_busy=True)[0]) == 2
    assert len(choose(busy, need, allow_busy=False, own_pids=(4242,))[0]) == 2


def test_name_and_memory_match() -> None:
    h100 = inventory("h100-sxm-8.json")
    assert choose(h100, Need("gb300-nvl72", 4, "GB300", 250), False)[0] == []
    gb300 = inventory("gb300-node-4.json")
    assert len(choose(gb300, Need("gb300-nvl72", 4, "GB300", 250), False)[0]) == 4
    # 268 GiB recorded: a profile asking for more rejects every GPU, saying why
    fit, rejected = choose(gb300, Need("big", 4, "GB300", 300), False)
    assert fit == [] and rejected[0][1] == "268 GiB < 300 GiB"


def test_two_allocations_never_share_a_gpu(tmp_path: Path) -> None:
    inv = inventory("h100-sxm-8.json")
    half = Need("h100-sxm", 4, "H100")
    first = allocate(inv, half, tmp_path, allow_busy=False)
    second = allocate(inv, half, tmp_path, allow_busy=False)
    try:
        assert len(first.uuids) == len(second.uuids) == 4
        assert set(first.uuids).isdisjoint(second.uuids)
        assert set(first.uuids) | set(second.uuids) == {g.uuid for g in inv.gpus}
        with pytest.raises(Shortage) as info:
            allocate(inv, Need("h100-sxm", 1, "H100"), tmp_path, allow_busy=False)
        message = str(info.value)
        assert message.startswith("profile h100-sxm needs 1 GPU matching 'H100'; 8 of 8")
        assert message.count("held by") == 1 and message.count("(pid ") == 8
    finally:
        first.release()
        second.release()
    # released: the whole box is free again
    again = allocate(inv, H100, tmp_path, allow_busy=False)
    assert len(again.gpus) == 8
    again.release()


def test_a_failed_allocation_keeps_no_locks(tmp_path: Path) -> None:
    inv = inventory("h100-busy.json")
    with pytest.raises(Shortage, match="busy with foreign compute processes"):
        allocate(inv, Need("h100-sxm", 2, "H100"), tmp_path, allow_busy=False)
    # the one suitable GPU it locked on the way was released
    one = allocate(inv, Need("h100-sxm", 1, "H100"), tmp_path, allow_busy=False)
    assert one.gpus[0].index == 1
    one.release()


def test_no_gpus_names_the_missing_hardware(tmp_path: Path) -> None:
    with pytest.raises(Shortage) as info:
        allocate(inventory("no-driver.json"), Need("gb300-nvl72", 4, "GB300", 250), tmp_path, False)
    assert str(info.value) == (
        "profile gb300-nvl72 needs 4 GPUs matching 'GB300' with at least 250 GiB; "
        "this machine has no GPUs (NVML: NVML Shared Library Not Found)"
    )


def test_cpu_allocation_is_one_device_and_leaves_cuda_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "keep")
    cpu = Allocation()
    assert cpu.devices == 1
    with cuda_visible(cpu):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "keep"
    need = Need("gb300-nvl72", 4, "GB300")
    node = allocate(inventory("gb300-node-4.json"), need, tmp_path, False)
    assert node.devices == 4
    with cuda_visible(node):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(node.uuids)
        assert os.environ["CUDA_VISIBLE_DEVICES"].startswith("GPU-9f8e7d")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "keep"
    node.release()


# --- telemetry ---------------------------------------------------------------------


def _s(t_s: float, power: float, energy: float | None, clock: int = 1980, mask: int = 0):
    return GpuSample(int(t_s * 1e9), power, energy, clock, 60, 95, mask)


def test_gpu_summary_against_a_hand_calculation() -> None:
    per_gpu = {
        "a": [_s(0.0, 600, 1000.0), _s(0.1, 700, 1065.0), _s(0.2, 650, 1130.0)],
        "b": [_s(0.0, 500, 2000.0), _s(0.1, 500, 2050.0), _s(0.2, 520, 2100.0, 1800, 0x4)],
    }
    t = summarize_gpus(per_gpu)
    assert t is not None
    assert t.energy_j == pytest.approx((1130 - 1000) + (2100 - 2000))  # 230 J
    assert t.window_s == pytest.approx(0.2)
    assert t.mean_power_w == pytest.approx(230 / 0.2)  # 1,150 W for both GPUs
    assert t.max_power_w == 700 and t.min_sm_clock_mhz == 1800
    assert t.throttle_reasons == ("sw_power_cap",)
    assert t.throttled is False  # a power cap at full load is by design


def test_without_an_energy_counter_power_readings_give_the_mean() -> None:
    per_gpu = {
        "a": [_s(0.0, 600, None), _s(0.1, 700, None)],
        "b": [_s(0.0, 100, None), _s(0.1, 300, None)],
    }
    t = summarize_gpus(per_gpu)
    assert t is not None and t.energy_j is None
    assert t.mean_power_w == pytest.approx(650 + 200)


def test_thermal_slowdown_flags_the_run() -> None:
    t = summarize_gpus({"a": [_s(0, 600, 0.0), _s(1, 600, 600.0, mask=0x40 | 0x4)]})
    assert t is not None and t.throttled
    assert t.throttle_reasons == ("sw_power_cap", "hw_thermal_slowdown")


def test_sampler_reads_the_recorded_counters_at_start_and_stop() -> None:
    nvml = recorded("gb300-node-4.json")
    node = inventory("gb300-node-4.json")
    uuids = [g.uuid for g in node.gpus]
    # an interval far longer than the run: exactly the entry and exit readings
    with Sampler(nvml, uuids, interval_s=3600) as sampler:
        pass
    telemetry = sampler.summary()
    gpu = telemetry.gpu
    assert gpu is not None and gpu.gpus == 4 and gpu.samples == 2
    # independent: each GPU's second energy reading minus its first, mJ -> J
    doc = raw("gb300-node-4.json")
    expected = sum(
        (g["samples"][1]["energy_mj"] - g["samples"][0]["energy_mj"]) / 1000 for g in doc["gpus"]
    )
    assert gpu.energy_j == pytest.approx(expected)
    assert gpu.max_temperature_c == 68 and gpu.throttled is False
    assert telemetry.cpu.cores >= 1 and telemetry.cpu.wall_s >= 0


def test_sampler_catches_throttling_in_later_readings() -> None:
    nvml = recorded("gb300-node-4.json")
    uuids = [g.uuid for g in inventory("gb300-node-4.json").gpus]
    sampler = Sampler(nvml, uuids, interval_s=3600)
    with sampler:
        for _ in range(3):  # readings 2-4, as the thread would take them
            sampler._read_all()
    gpu = sampler.summary().gpu
    assert gpu is not None and gpu.samples == 5
    # GPU 2 recorded HW thermal slowdown (0x40) in its last two readings
    assert gpu.throttled and "hw_thermal_slowdown" in gpu.throttle_reasons
    assert gpu.max_temperature_c == 86 and gpu.min_sm_clock_mhz == 1890
    doc = raw("gb300-node-4.json")
    expected = sum((g["samples"][4]["energy_mj"] - g["samples"][0]["energy_mj"]) / 1000
                   for g in doc["gpus"])  # fmt: skip
    assert gpu.energy_j == pytest.approx(expected)


def test_cpu_only_sampler_has_no_gpu_part() -> None:
    with Sampler(None, ()) as sampler:
        sum(range(10_000))
    telemetry = sampler.summary()
    assert telemetry.gpu is None
    assert telemetry.cpu.cpu_s >= 0 and telemetry.cpu.busy_cores >= 0


def test_energy_per_token_and_tokens_per_watt_from_a_recorded_series() -> None:
    from pytest_tokperf.driver import RequestRecord
    from pytest_tokperf.engines import EngineInfo
    from pytest_tokperf.hardware.telemetry import CpuTelemetry, Telemetry
    from pytest_tokperf.metrics import NS, summarize, with_telemetry

    # 4 requests of 250 tokens over 2 s on a 4-GPU node: 1,000 tokens, 500 tokens/s
    records = [RequestRecord(f"r{i}", 0, 2 * NS, (NS,), (250,)) for i in range(4)]
    result = summarize(
        records, EngineInfo("trtllm", "m", "nvfp4", 4), scenario="offline", workload="w",
        max_tokens=None,
    )  # fmt: skip
    doc = raw("gb300-node-4.json")
    per_gpu = {
        g["uuid"]: [
            GpuSample(
                int(k * 0.5 * NS),
                s["power_mw"] / 1000,
                s["energy_mj"] / 1000,
                2000,
                70,
                99,
                s["throttle_reasons"],
            )
            for k, s in enumerate(g["samples"])
        ]
        for g in doc["gpus"]
    }
    telemetry = Telemetry(CpuTelemetry(2.0, 1.5, 16, 3.0), summarize_gpus(per_gpu))
    derived = with_telemetry(result, telemetry)
    # by hand: energy = sum over GPUs of (last - first) counter, in J; window 2 s
    energy_j = sum((g["samples"][-1]["energy_mj"] - g["samples"][0]["energy_mj"]) / 1000
                   for g in doc["gpus"])  # fmt: skip
    assert energy_j == pytest.approx(4 * 440 + 0)  # each counter rose 440,000 mJ
    assert derived.energy_j_per_token == pytest.approx(energy_j / 1000)
    assert derived.tokens_per_s_per_watt == pytest.approx(500 / (energy_j / 2.0))
    # over the whole run, tokens/s per W is tokens per joule: the inverse of J/token
    assert derived.tokens_per_s_per_watt == pytest.approx(1 / derived.energy_j_per_token)
    assert derived.client_busy_cores == pytest.approx(0.75)
    assert derived.throttled is True  # GPU 2's thermal slowdown
    assert derived.tokens_per_s == result.tokens_per_s  # nothing else changes


# --- NVML details, compute capability, CUDA_VISIBLE_DEVICES, all-or-none ----------------


def test_every_nvlink_is_asked_even_past_an_unsupported_one() -> None:
    h200 = inventory("h200-8.json")
    states = raw("h200-8.json")["gpus"][0]["nvlink_states"]
    assert states[6] is None  # NotSupported in the middle of the range
    assert h200.gpus[0].nvlinks_active == sum(1 for s in states if s) == 17
    assert h200.gpus[1].nvlinks_active == 18
    assert inventory("l40s-2.json").gpus[0].nvlinks_active == 0  # no NVLink at all


def test_compute_capability_is_read_and_must_agree() -> None:
    h200 = inventory("h200-8.json")
    assert h200.gpus[0].compute_capability == (9, 0)
    assert inventory("gb300-node-4.json").gpus[0].compute_capability == (10, 3)
    # a part named like a GB300 but reporting Blackwell's 10.0 is no GB300
    gb300 = Need("gb300-nvl72", 4, "GB300", 250, (10, 3))
    assert len(choose(inventory("gb300-node-4.json"), gb300, False)[0]) == 4
    wrong = Need("gb200-like", 1, "GB300", 250, (10, 0))
    fit, rejected = choose(inventory("gb300-node-4.json"), wrong, False)
    assert fit == [] and rejected[0][1] == "compute capability 10.3, not 10.0"
    assert (
        wrong.describe() == "1 GPU matching 'GB300' with at least 250 GiB, compute capability 10.0"
    )


class _OldDriver(RecordedNvml):
    """A driver that lacks a versioned call: pynvml raises NVMLLibraryMismatchError."""

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:
        raise self.NVMLLibraryMismatchError("driver lacks nvmlDeviceGetComputeRunningProcesses_v3")


class _OldPynvml(RecordedNvml):
    """nvidia-ml-py before 12.535.77: only the deprecated ThrottleReasons name."""

    nvmlDeviceGetCurrentClocksEventReasons = None  # type: ignore[assignment]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: int) -> int:
        return 0x40


def test_library_mismatch_is_a_value_not_reported_never_an_escape() -> None:
    assert not issubclass(RecordedNvml.NVMLLibraryMismatchError, RecordedNvml.NVMLError)
    inv = read_inventory(_OldDriver(raw("h100-busy.json")))
    assert len(inv.gpus) == 2 and all(g.processes == () for g in inv.gpus)

    class NoInit(RecordedNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLLibraryMismatchError("nvmlInit_v2")

    assert read_inventory(NoInit(raw("h100-busy.json"))).error == "NVML: nvmlInit_v2"


def test_clock_event_reasons_and_the_deprecated_name() -> None:
    nvml = recorded("gb300-node-4.json")
    masks = [read_sample(nvml, 2).throttle_reasons for _ in range(4)]
    assert masks == [
        s["throttle_reasons"] for s in raw("gb300-node-4.json")["gpus"][2]["samples"][:4]
    ]
    old = _OldPynvml(raw("gb300-node-4.json"))
    assert read_sample(old, 0).throttle_reasons == 0x40


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        ("1", [1]),
        ("3,1", [3, 1]),
        ("GPU-4200a005", [5]),  # a UUID prefix, as CUDA accepts
        ("GPU-4200a0020000-5555-6666-7777-888899990000,0", [2, 0]),
        ("2,bogus,4", [2]),  # CUDA stops at the first entry naming no GPU
        ("", []),
        ("-1", []),
    ],
)
def test_an_inherited_cuda_visible_devices_restricts_the_inventory(
    visible: str, indices: list[int]
) -> None:
    inv = inventory("h200-8.json").restrict(visible)
    assert [g.index for g in inv.gpus] == indices
    assert inv.visible == visible
    if not indices:
        assert inv.error == f"CUDA_VISIBLE_DEVICES={visible!r} leaves none of 8 GPUs"
    assert inventory("h200-8.json").restrict(None) == inventory("h200-8.json")


def test_allocation_is_all_or_none_in_uuid_order(tmp_path: Path) -> None:
    inv = inventory("h200-8.json").restrict("7,0,3")
    need = Need("h200", 2, "H200")
    first = allocate(inv, need, tmp_path, False)
    assert first.uuids == tuple(sorted(g.uuid for g in inv.gpus)[:2])
    with pytest.raises(Shortage, match="held by other tokperf processes"):
        allocate(inv, need, tmp_path, False)  # one is free, two are needed: none taken
    last = allocate(inv, Need("h200", 1, "H200"), tmp_path, False)
    assert last.uuids == (sorted(g.uuid for g in inv.gpus)[2],)
    for allocation in (first, last):
        assert len(allocation.fds) == len(allocation.gpus)
        allocation.release()
        assert allocation.fds == ()
