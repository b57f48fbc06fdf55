"""Formatting: the failure message shape, the table, the JSON document."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.metrics import NS, summarize
from pytest_tokperf.profiles import BUILTIN
from pytest_tokperf.report import document, failure_message, num, payload, table, write_json
from pytest_tokperf.verdict import judge


def _payload(tokens: int, devices: int, floors: dict[str, float], error: str | None = None):
    # twelve requests (an Offline floor needs 10) issued at 0, each delivering 1/20 of
    # its tokens in the middle of every 50 ms: a steady rate, so the interval has zero width
    recs = [
        RequestRecord(
            f"r{i}",
            0,
            NS,
            tuple((2 * k + 1) * NS // 40 for k in range(20)),
            (tokens // 240,) * 20,
            error=error if i == 0 else None,
        )
        for i in range(12)
    ]
    info = EngineInfo("trtllm", "llama2-70b", "nvfp4", devices)
    res = summarize(recs, info, scenario="offline", workload="w", max_tokens=None)
    return payload("t.py::test_x", res, judge(res, floors), floors, BUILTIN["gb300-nvl72"])


def test_number_format() -> None:
    assert [num(12_480.4), num(98.74), num(4.254), num(5.0), num(None)] == [
        "12,480",
        "98.7",
        "4.25",
        "5",
        "-",
    ]


def test_failure_message_has_metric_observed_floor_and_context() -> None:
    p = _payload(49_920, devices=4, floors={"per_gpu": 15_200})  # 12,480 per GPU
    assert failure_message(p) == (
        "offline output tokens/s per GPU 12,480 (95% CI 12,480-12,480) < floor 15,200 "
        "[profile gb300-nvl72, engine trtllm, model llama2-70b nvfp4, 4 GPUs, 12 requests]"
    )


def test_failed_requests_are_listed() -> None:
    p = _payload(40_000, devices=1, floors={}, error="HTTP 500")
    message = failure_message(p)
    assert message.startswith("1 requests failed (none may fail) [profile gb300-nvl72")
    assert "  request r0: HTTP 500" in message


def test_table_has_one_aligned_row_per_test() -> None:
    p = _payload(49_920, devices=4, floors={"per_gpu": 15_200})
    lines = table([p, {**p, "nodeid": "t.py::test_longer_name", "verdict": "PASS"}])
    assert len(lines) == 3
    assert lines[0].split()[:3] == ["test", "scenario", "requests"]
    assert lines[1].split() == [
        "t.py::test_x",
        "offline",
        "12",
        "49,920",
        "12,480",
        "15,200/dev",
        "25",  # TTFT p99: the first chunk at 25 ms
        "ms",
        "0.23",  # TPOT p99: (1 s - 25 ms) / (4,160 - 1) tokens
        "ms",
        "FAIL",
    ]
    assert len({line.index("offline") for line in lines[1:]}) == 1  # aligned


def test_json_document_round_trips(tmp_path: Path) -> None:
    p = _payload(49_920, devices=4, floors={"per_gpu": 15_200})
    doc = document([p], BUILTIN["gb300-nvl72"], "--tokperf-profile")
    path = tmp_path / "sub" / "results.json"
    write_json(path, doc)
    loaded = json.loads(path.read_text())
    assert loaded["summary"] == {
        "PASS": 0,
        "FAIL": 1,
        "INCONCLUSIVE": 0,
        "INVALID": 0,
        "MEASURED": 0,
        "SKIPPED": 0,
        "ACKNOWLEDGED": 0,
    }
    assert loaded["profile"]["name"] == "gb300-nvl72"
    assert loaded["tests"][0]["tokens_per_s_per_gpu"] == p["tokens_per_s_per_gpu"]
    assert "pytest" in loaded["packages"]
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left


def test_gpu_telemetry_shows_in_table_message_and_payload() -> None:
    import dataclasses

    from pytest_tokperf.hardware.telemetry import CpuTelemetry, GpuSample, Telemetry, summarize_gpus
    from pytest_tokperf.metrics import with_telemetry

    # tokens spread evenly over the run: a narrow interval, so the verdict is decisive
    chunks = tuple(NS * (2 * k + 1) // 20 for k in range(10))
    recs = [RequestRecord(f"r{i}", 0, NS, chunks, (416,) * 10) for i in range(12)]
    info = EngineInfo("trtllm", "llama2-70b", "nvfp4", 4)
    res = summarize(recs, info, scenario="offline", workload="w", max_tokens=None)
    # 4 GPUs x 1,000 J over the 1 s run: 49,920 tokens -> 0.0801 J/token
    series = {
        f"g{i}": [
            GpuSample(0, 1000.0, 0.0, 1900, 80, 99, 0),
            GpuSample(NS, 1000.0, 1000.0, 1700, 90, 99, 0x40),
        ]
        for i in range(4)
    }
    res = with_telemetry(res, Telemetry(CpuTelemetry(1.0, 0.5, 16, 2.0), summarize_gpus(series)))
    floors = {"per_gpu": 15_200.0}
    p = payload("t.py::test_x", res, judge(res, floors), floors, BUILTIN["gb300-nvl72"],
                gpus=["GPU-a", "GPU-b", "GPU-c", "GPU-d"])  # fmt: skip
    assert p["energy_j_per_token"] == 4_000 / 49_920
    assert p["tokens_per_s_per_watt"] == 49_920 / 4_000
    assert p["gpus"] == ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]
    gpu = dataclasses.asdict(res.telemetry)["gpu"]
    assert p["telemetry"]["gpu"] == {
        **gpu,
        "throttle_reasons": ["hw_thermal_slowdown"],
        "cotenants": [],
    }
    assert json.loads(json.dumps(p)) == p  # plain JSON data
    header, row = table([p])
    assert header.split()[-4:] == ["J/token", "proc", "CPU", "verdict"]
    assert row.split()[-4:] == ["0.08", "0.50/16", "FAIL", "(throttled)"]
    assert failure_message(p).splitlines()[1] == (
        "  note: the GPUs slowed their clocks during the run (hw_thermal_slowdown)"
    )


def test_printed_intervals_name_the_confidence_that_produced_them() -> None:
    recs = [
        RequestRecord(f"r{i}", 0, NS, tuple((2 * k + 1) * NS // 40 for k in range(20)), (2,) * 20)
        for i in range(10)
    ]
    info = EngineInfo("sim", "sim", "none", 1)
    offline = summarize(recs, info, scenario="offline", workload="w", max_tokens=None)
    floors = {"min_tokens_per_s": 1e9}
    p = payload("t.py::x", offline, judge(offline, floors, looks=5), floors, BUILTIN["sim"])
    assert p["confidence"] == 0.95 and p["confidence_per_look"] == 0.99
    assert p["checks"][1]["confidence"] == 0.99 and p["checks"][1]["batches"] == 10
    assert failure_message(p).startswith(
        "offline output tokens/s 400 (99% CI 400-400 per look; 95% over 5 looks) < floor"
    )
    # a run over time too short for independent batch windows: no interval at all
    short = summarize(recs, info, scenario="concurrency", workload="w", max_tokens=None)
    p = payload("t.py::x", short, judge(short, floors), floors, BUILTIN["sim"])
    assert p["verdict"] == "INCONCLUSIVE"
    assert failure_message(p).startswith(
        "INCONCLUSIVE: concurrency output tokens/s 400 has no interval: 0 independent batch "
        "windows after the ramp, at least 6 needed; a longer run gives more [profile sim,"
    )


def test_slo_observed_and_estimate_side_by_side_in_the_table() -> None:
    recs = [
        RequestRecord(f"r{k}", k * NS, k * NS + NS // 2, (k * NS + ms * NS // 1000,), (1,),
                      scheduled_ns=k * NS)
        for k, ms in enumerate([100] * 50 + [300])
    ]  # fmt: skip
    res = summarize(recs, EngineInfo("sim", "sim", "none", 1), scenario="server",
                    workload="w", max_tokens=None, qps=1.0)  # fmt: skip
    slos = {"ttft_p50_ms": 200.0}
    p = payload("t.py::x", res, judge(res, {}, slos), {}, BUILTIN["sim"], slos)
    (check,) = p["checks"][1:]
    assert (check["observed"], check["estimate"], check["over"], check["count"]) == (
        100.0,
        100.0,
        1,
        51,
    )
    assert p["verdict"] == "PASS"
    header, row = table([p])
    assert "SLO observed/estimate" in header and "TTFT p50 100/100 ms" in row
