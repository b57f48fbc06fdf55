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


def _telemetry_run(nodeid: str = "t.py::test_x"):
    """A 4-GPU Offline run with energy and client CPU measured, its GPUs throttled: its
    payload and its result."""
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
    p = payload(nodeid, res, judge(res, floors), floors, BUILTIN["gb300-nvl72"],
                gpus=["GPU-a", "GPU-b", "GPU-c", "GPU-d"])  # fmt: skip
    return p, res


def test_gpu_telemetry_shows_in_table_message_and_payload() -> None:
    import dataclasses

    p, res = _telemetry_run()
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


def _slo_payload(nodeid: str = "t.py::x"):
    """A Server run at 1 qps judged on a TTFT p50 SLO: 50 first tokens at 100 ms, one
    at 300 ms."""
    recs = [
        RequestRecord(f"r{k}", k * NS, k * NS + NS // 2, (k * NS + ms * NS // 1000,), (1,),
                      scheduled_ns=k * NS)
        for k, ms in enumerate([100] * 50 + [300])
    ]  # fmt: skip
    res = summarize(recs, EngineInfo("sim", "sim", "none", 1), scenario="server",
                    workload="w", max_tokens=None, qps=1.0)  # fmt: skip
    slos = {"ttft_p50_ms": 200.0}
    return payload(nodeid, res, judge(res, {}, slos), {}, BUILTIN["sim"], slos)


def test_slo_observed_and_estimate_side_by_side_in_the_table() -> None:
    p = _slo_payload()
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


LONG_IDS = (
    "examples/test_llama2_70b_acceptance.py::test_offline_throughput_per_node_longer_answers",
    "examples/test_serving_slos.py::test_server_smoke_on_small_machines",
    "examples/test_release_gate.py::test_offline_throughput_against_baseline",
    "examples/test_llama2_70b_acceptance.py::test_whole_rack_offline",
)


def _suite() -> list[dict]:
    """Payloads of a real suite's summary: long test ids, energy and client CPU measured,
    an SLO column, a 1-device run, a skipped test; the verdicts carry their marks."""
    telemetry, _ = _telemetry_run(LONG_IDS[0])
    one = _payload(4_000, devices=1, floors={"min_tokens_per_s": 1e9})
    return [
        telemetry,
        _slo_payload(LONG_IDS[1]),
        {**one, "nodeid": LONG_IDS[2], "verdict": "INCONCLUSIVE", "throttled": True},
        {**one, "nodeid": LONG_IDS[3], "verdict": "SKIPPED"},
    ]


def _fits_with_verdicts_whole(lines: list[str], verdicts: tuple[str, ...]) -> None:
    """Every line in 120 characters, each row ending in its whole verdict, aligned."""
    assert max(map(len, lines)) <= 120
    header, *rows = lines[:-1]
    for row, verdict in zip(rows, verdicts, strict=True):
        assert row.endswith("  " + verdict), row
    assert {row.rindex(v) for row, v in zip(rows, verdicts, strict=True)} == {
        header.rindex("verdict")
    }  # the verdict column still aligned, still last


VERDICTS = ("FAIL (throttled)", "PASS", "INCONCLUSIVE (throttled)", "SKIPPED")


def test_the_narrow_table_fits_120_characters_and_keeps_each_verdict_whole() -> None:
    assert max(map(len, table(_suite()))) > 200  # the table this is about
    lines = table(_suite(), 120)
    _fits_with_verdicts_whole(lines, VERDICTS)
    # the columns left out, the least essential first, named once below the table
    assert lines[-1] == (
        "-v or --tokperf-table wide shows whole test ids, proc CPU, J/token, TPOT p99, "
        "SLO observed/estimate, requests, TTFT p99"
    )
    assert lines[0].split() == [
        "test", "scenario", "tokens/s", "per", "device", "floor", "verdict",
    ]  # fmt: skip
    # the tests' names alone tell them apart: whole, without their files
    assert [line.split()[0] for line in lines[1:-1]] == [i.split("::")[1] for i in LONG_IDS]
    assert lines[2].split()[:3] == ["test_server_smoke_on_small_machines", "server", "1.01"]


def test_tests_that_share_a_name_keep_their_files_in_the_narrow_table() -> None:
    suite = _suite()
    suite[3] = {**suite[3], "nodeid": "examples/other.py::test_server_smoke_on_small_machines"}
    lines = table(suite, 120)
    _fits_with_verdicts_whole(lines, VERDICTS)
    assert [line.split()[0] for line in lines[1:-1]] == [
        "test_llama2_70b_ac…ine_throughput_per_node_longer_answers",  # its middle cut
        "test_serving_slos.py::test_server_smoke_on_small_machines",
        "test_release_gate.…st_offline_throughput_against_baseline",
        "other.py::test_server_smoke_on_small_machines",
    ]
    assert lines[-1].endswith(", requests and 2 more")  # the footnote in 120 characters too
    assert len(lines[-1]) <= 120


def test_a_table_that_fits_is_the_whole_table() -> None:
    suite = _suite()
    wide = table(suite)
    assert table(suite, max(map(len, wide))) == wide  # nothing left out, no footnote
    assert wide[0].split()[:12] == [
        "test", "scenario", "requests", "tokens/s", "per", "device", "floor", "TTFT", "p99",
        "TPOT", "p99", "J/token",
    ]  # fmt: skip
    assert [line.split()[0] for line in wide[1:]] == list(LONG_IDS)
    assert "TTFT p50 100/100 ms" in wide[2] and "0.50/16" in wide[1]


def test_narrowing_drops_a_repeated_column_first_and_cuts_the_widest_cells_last() -> None:
    from pytest_tokperf.columns import fit

    rows = [
        ("test", "tokens/s", "per device", "note", "verdict"),
        ("d/test_a.py::test_one_two_three", "100", "100", "a long note here", "PASS"),
        ("d/test_a.py::test_four", "50", "50", "-", "FAIL (busy)"),
    ]
    assert fit(rows, {1, 2}, 200, repeats=("per device",)) == fit(rows, {1, 2}, 200)
    assert fit(rows, {1, 2}, 71, repeats=("per device",)) == [
        "test                           tokens/s  note              verdict",
        "test_a.py::test_one_two_three       100  a long note here  PASS",
        "test_a.py::test_four                 50  -                 FAIL (busy)",
        "-v or --tokperf-table wide shows per device, whole test ids",
    ]  # the directories go, then (below) the files
    assert fit(rows, {1, 2}, 69, repeats=("per device",))[1:3] == [
        "test_one_two_three       100  a long note here  PASS",
        "test_four                 50  -                 FAIL (busy)",
    ]
    assert fit(rows, {1, 2}, 40, repeats=("per device",)) == [
        "test     tokens/s  note      verdict",
        "te…hree       100  a long …  PASS",
        "te…four        50  -         FAIL (busy)",
        "-v or --tokperf-table wide shows the whole table",  # no list fits in 40
    ]
    # too narrow for anything but the verdicts: every other cell down to one character
    assert fit(rows, set(), 10)[1:3] == ["…  …  …  …  PASS", "…  …  …  -  FAIL (busy)"]
