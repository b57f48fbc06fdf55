"""Change points (pure) and the history store and command on hand-made rows and files."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
from scipy import stats

from pytest_tokperf import changepoints, history
from pytest_tokperf.__main__ import main


def _noisy(means: list[float], seed: int, cv: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [m * (1 + rng.gauss(0, cv)) for m in means]


def test_a_step_is_found_where_it_is_with_its_numbers() -> None:
    values = _noisy([200.0] * 15 + [190.0] * 15, seed=1)
    (c,) = changepoints.changes(values)
    assert c.index == 15
    left, right = values[:15], values[15:]
    assert c.before.mean == pytest.approx(sum(left) / 15)
    assert c.after.mean == pytest.approx(sum(right) / 15)
    half = 2.144787 * statistics.stdev(right) / math.sqrt(15)  # t(0.975, 14), from tables
    assert (c.after.low, c.after.high) == pytest.approx((c.after.mean - half, c.after.mean + half))
    # pooled two-sample t by hand, two-sided, times the 25 places a split could be
    pooled = (14 * statistics.variance(left) + 14 * statistics.variance(right)) / 28
    t = (sum(left) / 15 - sum(right) / 15) / math.sqrt(pooled * (2 / 15))
    assert c.p_value == pytest.approx(min(1.0, 25 * 2 * stats.t.sf(abs(t), 28)), rel=1e-6)
    assert c.ratio == pytest.approx(c.after.mean / c.before.mean)


def test_two_steps_both_found() -> None:
    values = _noisy([200.0] * 10 + [180.0] * 10 + [200.0] * 10, seed=2)
    assert [c.index for c in changepoints.changes(values)] == [10, 20]


@pytest.mark.parametrize("seed", range(5))
def test_no_change_and_one_outlier_night_find_nothing(seed: int) -> None:
    flat = _noisy([200.0] * 30, seed)
    assert changepoints.changes(flat) == []
    flat[20] *= 0.7  # one bad night
    assert changepoints.changes(flat) == []


def test_too_short_or_constant_series() -> None:
    assert changepoints.changes([200.0, 150.0, 150.0, 150.0, 150.0]) == []  # < 3 a side
    assert changepoints.changes([200.0] * 10) == []
    (c,) = changepoints.changes([200.0] * 5 + [150.0] * 5)  # no noise at all
    assert (c.index, c.p_value, c.before.low, c.after.high) == (5, 0.0, 200.0, 150.0)


def _change(before: float, after: float) -> changepoints.Change:
    seg = changepoints.Segment
    flat = seg(0, 3, before, before, before), seg(3, 6, after, after, after)
    return changepoints.Change(3, *flat, 0.0)


def test_regressed_is_the_newest_change_beyond_the_tolerance_in_its_direction() -> None:
    drop, rise = _change(200, 180), _change(180, 200)
    assert history.regressed([drop], "tokens_per_s", 0.05)  # 10% fewer tokens/s
    assert not history.regressed([drop], "tokens_per_s", 0.15)
    assert not history.regressed([drop, rise], "tokens_per_s", 0.05)  # recovered since
    assert history.regressed([rise], "ttft_p99", 0.05)  # latency 11% longer: worse
    assert not history.regressed([drop], "ttft_p99", 0.05)
    assert not history.regressed([], "tokens_per_s", 0.05)


def _payload(nodeid: str, rate: float, **extra: object) -> dict:
    return {
        "nodeid": nodeid, "profile": "cpu", "device_kind": "cpu", "scenario": "offline",
        "workload": "default", "max_tokens": 16, "qps": None, "concurrency": None,
        "tokens_per_s": rate, "ttft_s": {"p99": 0.5}, "tpot_s": {"p99": None},
        "e2e_s": {"p99": 1.0}, "engine": {"model": "m", "precision": "q8_0"},
        "hardware": {"kind": "cpu", "model": "CPU", "count": 2}, "verdict": "PASS", **extra,
    }  # fmt: skip


def _doc(started: str, tests: list[dict], pid: int = 1) -> dict:
    return {"schema": "pytest-tokperf/results/1", "created": started, "commit": "abc",
            "run": {"host": "h", "pid": pid, "started": started}, "tests": tests}  # fmt: skip


def test_rows_keep_measured_perf_tests_and_their_metrics() -> None:
    doc = _doc("2026-01-02T03:04:05+0000", [
        _payload("t.py::a", 100.0),
        _payload("t.py::b", 90.0, verdict="INVALID"),
        _payload("t.py::c", 0.0, kind="accuracy_parity"),
    ])  # fmt: skip
    (row,) = history.rows(doc, "r1.json")
    assert row["key"]["test"] == "t.py::a" and row["key"]["hardware"] == "CPU x2"
    assert row["run"] == {"name": "r1.json", "date": "2026-01-02T03:04:05+0000",
                          "commit": "abc", "host": "h", "pid": 1, "id": None}  # fmt: skip
    assert row["metrics"] == {"tokens_per_s": 100.0, "ttft_p99": 0.5, "e2e_p99": 1.0}


def test_a_run_counts_once_by_its_id_and_two_runs_of_one_process_twice(tmp_path: Path) -> None:
    same_second = "2026-01-02T03:04:05+0000"
    for name in ("a.json", "b.json"):  # two runs in one process (pytester), one second
        _write(tmp_path, name, _doc(same_second, [_payload("t.py::a", 100.0)]))
    assert len(history.load(tmp_path)[0]) == 2
    doc = _doc(same_second, [_payload("t.py::a", 100.0)])
    doc["run"]["id"] = "f00d"
    _write(tmp_path, "c.json", doc)
    history.append(tmp_path, doc, "c.json")  # the same run in the store too
    assert len(history.load(tmp_path)[0]) == 3


def _write(directory: Path, name: str, doc: dict) -> None:
    (directory / name).write_text(json.dumps(doc))


def test_the_command_orders_by_date_filters_since_and_reads_a_torn_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # named against their dates: the order must come from the dates
    for n in range(10):
        rate = 100.0 if n < 5 else 80.0
        doc = _doc(f"2026-01-{n + 1:02d}T00:00:00+0000", [_payload("t.py::a", rate + n % 2)], n)
        _write(tmp_path, f"z{9 - n}.json", doc)
    history.append(tmp_path / "store", _doc("2026-01-11T00:00:00+0000",
                   [_payload("t.py::a", 80.0)], pid=99), "late.json")  # fmt: skip
    assert main(["history", str(tmp_path), "--metric", "tokens_per_s"]) == 1
    out = capsys.readouterr().out
    assert "10 runs, 1 change point" in out and "z4.json (2026-01-06" in out
    assert main(["history", str(tmp_path), "--since", "2026-01-06"]) == 0  # only the 80s
    assert "tokens_per_s: 5 runs, 0 change points" in capsys.readouterr().out

    store = tmp_path / "store"
    (path,) = store.glob("*.jsonl")
    with path.open("a") as f:
        f.write('{"schema": "pytest-tok')  # a writer killed mid-line
    found, notes = history.load(store)
    assert len(found) == 1 and notes == []
    path.write_text('{"cut\n' + path.read_text())
    with pytest.raises(history.HistoryError, match=r"\.jsonl:1: not a JSON line"):
        history.load(store)


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["history", str(tmp_path)]) == 2
    assert f"no runs in {tmp_path}" in capsys.readouterr().err
    assert main(["history", str(tmp_path), "--metric", "speed"]) == 2
    assert "unknown --metric 'speed'; one of tokens_per_s" in capsys.readouterr().err
    assert main(["history", str(tmp_path), "--since", "last week"]) == 2
    assert "write YYYY-MM-DD" in capsys.readouterr().err
    (tmp_path / "base.json").write_text('{"schema": "pytest-tokperf/baseline/1"}')
    (tmp_path / "bad.json").write_text("{")
    assert main(["history", str(tmp_path)]) == 2
    assert "bad.json: cannot read it as JSON" in capsys.readouterr().err
    (tmp_path / "bad.json").unlink()
    assert main(["history", str(tmp_path)]) == 2
    assert "base.json: not a tokperf results file, skipped" in capsys.readouterr().err
