"""Baseline keys, messages, acknowledgements and the step summary (no engine)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from pytest_tokperf import acknowledged, baseline, summary, verdict
from pytest_tokperf.regression import Check


def _payload(**over: object) -> dict:
    p = {
        "nodeid": "t.py::test_a",
        "verdict": "PASS",
        "profile": "cpu",
        "device_kind": "cpu",
        "scenario": "offline",
        "qps": None,
        "concurrency": None,
        "workload": "default",
        "max_tokens": 64,
        "tokens_per_s": 150.0,
        "ttft_s": {"p99": 0.1},
        "tpot_s": {"p99": 0.01},
        "hardware": {"kind": "cpu", "model": "Intel Xeon", "count": 2},
        "engine": {"backend": "llamacpp", "model": "SmolLM2", "precision": "q4_1"},
    }
    p.update(over)
    return p


def _block(status: str = "FAIL", note: str = "") -> dict:
    return {
        "compared": True,
        "status": status,
        "confidence": 0.95,
        "baseline": {
            "key": baseline.key(_payload()),
            "provenance": {"date": "2026-11-30T10:00:00+00:00", "commit": "abc1234def"},
        },
        "checks": [
            {"metric": "tokens_per_s", "observed": 150.0, "baseline": 200.0, "ratio": 0.75,
             "low": 0.719, "high": 0.781, "tolerance": 0.05, "status": status, "note": note}
        ],
    }  # fmt: skip


def test_message_has_the_issues_shape() -> None:
    (line,) = summary.regression_lines(_payload(regression=_block()))
    assert line == (
        "output tokens/s 150 vs baseline 200 (-25.0%, 95% CI -28.1%..-21.9%) exceeds the "
        "allowed 5% drop [baseline 2026-11-30, commit abc1234, same profile cpu on Intel Xeon x2]"
    )


def test_latency_message_and_improvement() -> None:
    check = {"metric": "ttft_p99", "observed": 0.12, "baseline": 0.1, "ratio": 1.2, "low": 1.15,
             "high": 1.25, "tolerance": 0.1, "status": "FAIL", "note": ""}  # fmt: skip
    assert summary.check_line(check, 0.95) == (
        "TTFT p99 120 ms vs baseline 100 ms (+20.0%, 95% CI +15.0%..+25.0%) exceeds the "
        "allowed 10% rise"
    )
    better = {**check, "metric": "tokens_per_s", "observed": 260.0, "baseline": 200.0,
              "ratio": 1.3, "low": 1.25, "high": 1.35, "status": "IMPROVED"}  # fmt: skip
    assert summary.check_line(better, 0.95).startswith("IMPROVED: output tokens/s 260 vs")


def test_an_undecided_comparison_says_whether_more_data_would_help() -> None:
    """The CI recipe's unchanged rerun on a drifting machine: -15.2%, 95% CI -20.9..-9.0%
    against a 10% tolerance. The interval (11.9 points) is about as wide as the band's
    10: a longer run narrows it onto the drift, so the advice names the drift."""
    narrow = {"metric": "tokens_per_s", "observed": 65.6, "baseline": 77.3, "ratio": 0.848,
              "low": 0.791, "high": 0.870, "tolerance": 0.10, "status": "INCONCLUSIVE",
              "note": ""}  # fmt: skip
    line = summary.check_line(narrow, 0.95)
    assert line.startswith("INCONCLUSIVE: output tokens/s 65.6 vs baseline 77.3 (-15.2%")
    assert "machine's speed moved between the runs" in line and "calibrate" in line
    wide = {**narrow, "low": 0.70, "high": 1.02}  # 32 points: too little data
    assert summary.check_line(wide, 0.95).endswith("; a longer run narrows the interval")


def test_key_differences_name_each_key() -> None:
    here = baseline.key(_payload())
    there = baseline.key(
        _payload(hardware={"kind": "gpu", "model": "NVIDIA GB300", "count": 4}, max_tokens=128)
    )
    assert baseline.differences(here, there) == [
        "hardware '4 x NVIDIA GB300' (here 'Intel Xeon x2')",
        "workload 'default max_tokens 128' (here 'default max_tokens 64')",
    ]
    assert baseline.path_for(Path("b"), here) != baseline.path_for(Path("b"), there)


def test_tolerances_marker_overrides_and_turns_off() -> None:
    assert baseline.tolerances(None, 0.05) == {"tokens_per_s": 0.05}
    assert baseline.tolerances({"ttft_p99": 0.1}, 0.05) == {"tokens_per_s": 0.05, "ttft_p99": 0.1}
    assert baseline.tolerances({"tokens_per_s": None}, 0.05) == {}


def _regression(status: str) -> dict:
    row = {"metric": "tokens_per_s", "status": status, "ratio": 0.9, "low": 0.8, "high": 1.0,
           "tolerance": 0.05, "note": ""}  # fmt: skip
    return {"compared": True, "confidence": 0.95, "checks": [row]}


@pytest.mark.parametrize(
    ("others", "status", "expected"),
    [((), "PASS", "PASS"), ("PASS", "FAIL", "FAIL"), ("INVALID", "PASS", "INVALID"),
     ("PASS", "IMPROVED", "PASS"), ("PASS", "ACKNOWLEDGED", "ACKNOWLEDGED"),
     ("FAIL", "ACKNOWLEDGED", "FAIL"), ("PASS", "INCONCLUSIVE", "INCONCLUSIVE")],
)  # fmt: skip
def test_a_comparison_is_checks_of_the_one_judgment(
    others: str | tuple[()], status: str, expected: str
) -> None:
    """The regression checks join the test's other checks; the worst decides, and a
    regression-only test (no other gate) passes on its comparison alone."""
    kind = "validity" if others == "INVALID" else "floor"
    mine = [verdict.check("per_gpu", others, kind)] if others else []
    (check,) = baseline.checks(_regression(status), "fail")
    assert check.kind == "regression" and check.limit == 0.95
    assert (check.ci_low, check.ci_high, check.observed) == (0.8, 1.0, 0.9)
    assert verdict.decide([*mine, check]) == expected


@pytest.mark.parametrize(
    ("policy", "status", "expected"),
    [("fail", "FAIL", "FAIL"), ("inconclusive", "INCONCLUSIVE", "INCONCLUSIVE"),
     ("pass", "NOT MEASURED", "MEASURED")],
)  # fmt: skip
def test_a_missing_baseline_is_never_a_pass(policy: str, status: str, expected: str) -> None:
    (check,) = baseline.checks({"compared": False, "reason": "no baseline here"}, policy)
    assert (check.kind, check.status, check.detail) == ("baseline", status, "no baseline here")
    assert verdict.decide([check]) == expected
    floor = verdict.check("per_gpu", "PASS", "floor")
    assert verdict.decide([floor, check]) == ("PASS" if policy == "pass" else expected)


def _baselines(tmp_path: Path, expires: datetime.date) -> baseline.Baselines:
    (tmp_path / acknowledged.FILENAME).write_text(
        '[[regression]]\ntest = "t.py::test_a"\nmetric = "tokens_per_s"\naccepted = 150\n'
        f'reason = "known"\nexpires = {expires.isoformat()}\n'
    )
    from pytest_tokperf.hardware.inventory import Inventory

    return baseline.Baselines(None, tmp_path, 0.05, 0.95, tmp_path, Inventory(()),
                              acknowledged.load(tmp_path),
                              today=datetime.date(2026, 12, 1))  # fmt: skip


def test_acknowledged_until_the_date_then_failing(tmp_path: Path) -> None:
    check = Check("tokens_per_s", 148.0, 200.0, 0.74, 0.72, 0.76, 0.05, "FAIL", "m")
    row = _baselines(tmp_path, datetime.date(2026, 12, 1))._acknowledge("t.py::test_a", check)
    assert row["status"] == "ACKNOWLEDGED"  # valid through the expiry day; 148 >= 150 x 0.95
    row = _baselines(tmp_path, datetime.date(2026, 11, 30))._acknowledge("t.py::test_a", check)
    assert (
        row["status"] == "FAIL" and row["note"] == "acknowledged until 2026-11-30, expired: known"
    )
    worse = Check("tokens_per_s", 120.0, 200.0, 0.6, 0.58, 0.62, 0.05, "FAIL", "m")
    row = _baselines(tmp_path, datetime.date(2027, 1, 1))._acknowledge("t.py::test_a", worse)
    assert row["status"] == "FAIL" and row["note"].startswith("worse than the acknowledged 150")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[[regression]]\ntest = "a"\n', "missing metric, accepted, reason, expires"),
        ('[[regression]]\ntest="a"\nmetric="speed"\naccepted=1\nreason="r"\nexpires=2027-01-01\n',
         "metric 'speed' is not one of"),
        ('[[regression]]\ntest="a"\nmetric="ttft_p99"\naccepted=1\nreason="r"\nexpires="soon"\n',
         "expires must be a TOML date"),
    ],
)  # fmt: skip
def test_bad_acknowledgements_are_usage_errors(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / acknowledged.FILENAME).write_text(text)
    with pytest.raises(pytest.UsageError, match=error):
        acknowledged.load(tmp_path)


def test_step_summary_lists_regressions_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    payloads = [
        _payload(nodeid="t.py::test_a", verdict="PASS"),
        _payload(nodeid="t.py::test_z", verdict="FAIL", regression=_block()),
        {"nodeid": "t.py::test_s", "verdict": "SKIPPED", "profile": "cpu", "reason": "rack"},
    ]
    assert summary.write_step_summary(payloads) == target
    text = target.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert (
        rows[0]
        == "| `t.py::test_z` | **FAIL** | 150 | -25.0% (-28.1%..-21.9%) FAIL | 100 ms | 10 ms |"
    )
    assert rows[1].startswith("| `t.py::test_a` | **PASS** |")
    assert text.startswith("### tokperf: 1 FAIL, 1 PASS, 1 SKIPPED")
    assert "- `t.py::test_z`: output tokens/s 150 vs baseline 200" in text
