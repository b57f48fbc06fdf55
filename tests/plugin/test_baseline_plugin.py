"""Baselines on the sim engine: save at 200 tokens/s, compare at 150 and 200,
acknowledged and expired regressions, other hardware, the GitHub summary, the HTML report.

The sim engine runs one request at a time at a set per-request rate (wall clock, no
scaling), so "the engine at 150 tokens/s" is one setting of a user profile that keeps
its name: the baseline key (test, profile, hardware, model, precision, workload,
scenario) stays the same and only the engine settings (provenance) change.
"""

from __future__ import annotations

import datetime
import json
import re
from html.parser import HTMLParser

import pytest

SUITE = """
import pytest

@pytest.mark.no_regression(tokens_per_s=0.10)
def test_rate(tokperf):
    tokperf.run(requests=24, max_tokens=40, warmup=0)  # about 5 s: windows of 0.5 s
"""
PROFILE = """
[profiles.simrate]
extends = "sim"
engine = {{ tokens_per_s = {rate}, ttft_s = 0.0, jitter = 0.1, slots = 1 }}
"""
ARGS = ("--tokperf-profile", "simrate", "-p", "no:cacheprovider", "--tokperf-json", "out.json")


def _run(pytester: pytest.Pytester, rate: float, *args: str) -> pytest.RunResult:
    pytester.makefile(".toml", tokperf=PROFILE.format(rate=rate))
    return pytester.runpytest(*ARGS, *args)


def _test(pytester: pytest.Pytester) -> dict:
    doc = json.loads((pytester.path / "out.json").read_text())
    (test,) = doc["tests"]
    return test


def _acknowledge(pytester: pytest.Pytester, expires: datetime.date) -> None:
    pytester.makefile(
        ".toml",
        **{
            "tokperf-acknowledged": f"""
[[regression]]
test = "test_base.py::test_rate"
metric = "tokens_per_s"
accepted = 150
reason = "one slot until the batching fix lands"
expires = {expires.isoformat()}
"""
        },
    )


DROP = re.compile(
    r"output tokens/s (?P<cur>[\d.,]+) vs baseline (?P<base>[\d.,]+) "
    r"\((?P<pct>-[\d.]+)%, 95% CI (?P<low>-[\d.]+)%\.\.(?P<high>-[\d.]+)%\) exceeds the allowed "
    r"10% drop \[baseline \d{4}-\d\d-\d\d, commit \w+, same profile simrate on .+ x\d+\]"
)


def test_baseline_catches_a_drop_and_passes_unchanged(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_SHA", "abc1234def")
    pytester.makepyfile(test_base=SUITE)
    saved = _run(pytester, 200, "--tokperf-save-baseline", "base")
    saved.assert_outcomes(passed=1)  # no comparison asked: nothing to fail
    saved.stdout.fnmatch_lines(["baselines saved: 1 in base"])
    (path,) = (pytester.path / "base").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["key"]["profile"] == "simrate" and doc["key"]["test"] == "test_base.py::test_rate"
    assert doc["provenance"]["commit"] == "abc1234def"
    assert doc["provenance"]["engine_settings"]["tokens_per_s"] == 200
    assert len(doc["payload"]["windows_per_s"]) == 10
    assert len(doc["payload"]["token_windows_per_s"]) == 10  # an Offline run: equal work
    assert len(doc["payload"]["latencies_ms"]["ttft"]) == 24
    base_rate = doc["payload"]["tokens_per_s"]
    assert 170 < base_rate < 230  # one slot at 200 tokens/s, measured on a busy machine

    slow = _run(pytester, 150, "--tokperf-compare-baseline", "base")
    slow.assert_outcomes(failed=1)
    match = DROP.search(slow.stdout.str())
    assert match is not None, slow.stdout.str()
    low, pct, high = (float(match[k]) for k in ("low", "pct", "high"))
    assert low <= pct <= high < -10  # printed to 0.1%: a bound may round to the estimate
    assert -30 < pct < -20  # 150 against about 200
    test = _test(pytester)
    assert test["verdict"] == "FAIL" and test["regression"]["status"] == "FAIL"
    (check,) = test["regression"]["checks"]
    assert check["ratio"] == pytest.approx(test["tokens_per_s"] / base_rate, rel=1e-5)
    assert "windows of equal work" in check["method"]

    same = _run(pytester, 200, "--tokperf-compare-baseline", "base")
    same.assert_outcomes(passed=1)
    test = _test(pytester)
    assert test["verdict"] == "PASS" and test["regression"]["status"] == "PASS"
    assert test["regression"]["checks"][0]["low"] >= 0.9  # the whole interval within 10%

    # acknowledged until a future date: reported, not failed
    today = datetime.date.today()
    _acknowledge(pytester, today + datetime.timedelta(days=30))
    acked = _run(pytester, 150, "--tokperf-compare-baseline", "base")
    acked.assert_outcomes(passed=1)
    assert _test(pytester)["verdict"] == "ACKNOWLEDGED"
    assert json.loads((pytester.path / "out.json").read_text())["summary"]["ACKNOWLEDGED"] == 1
    acked.stdout.fnmatch_lines(
        ["*ACKNOWLEDGED: output tokens/s * accepted at 150 until *: one slot until the batching*"]
    )

    # expired yesterday: fails again, with the reason
    _acknowledge(pytester, today - datetime.timedelta(days=1))
    expired = _run(pytester, 150, "--tokperf-compare-baseline", "base")
    expired.assert_outcomes(failed=1)
    expired.stdout.fnmatch_lines(
        ["*exceeds the allowed 10% drop (acknowledged until *, expired: one slot until*"]
    )


def test_other_hardware_is_never_compared(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_base=SUITE)
    _run(pytester, 200, "--tokperf-save-baseline", "base").assert_outcomes(passed=1)
    (path,) = (pytester.path / "base").glob("*.json")
    doc = json.loads(path.read_text())
    doc["key"]["hardware"] = "4 x NVIDIA GB300"
    path.write_text(json.dumps(doc))
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = _run(pytester, 100, "--tokperf-compare-baseline", "base")
    result.assert_outcomes(failed=1)  # nothing to compare with is no pass
    result.stdout.fnmatch_lines(
        [
            "baseline comparison: 0 compared (none), 1 not compared",
            "  test_base.py::test_rate: not compared with a baseline: the stored baseline has "
            "other keys: hardware '4 x NVIDIA GB300' (here '* x*')",
        ]
    )
    test = _test(pytester)
    assert test["regression"]["status"] == "NO BASELINE" and test["verdict"] == "FAIL"
    text = summary.read_text()
    assert "| `test_base.py::test_rate` | **FAIL** |" in text
    assert "not compared" in text
    # a new runner with no baseline yet, on purpose: reported as measured, not passed
    allowed = _run(
        pytester, 100, "--tokperf-compare-baseline", "base", "--tokperf-baseline-missing", "pass"
    )
    allowed.assert_outcomes(passed=1)
    assert _test(pytester)["verdict"] == "MEASURED"
    assert "| `test_base.py::test_rate` | **MEASURED** |" in summary.read_text()


class _Figures(HTMLParser):
    """Counts figures with an inline <svg> per test section."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, int]] = {}
        self.current: str | None = None
        self.figure: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.current = a.get("data-nodeid")
            self.sections[str(self.current)] = {}
        elif tag == "figure":
            self.figure = a.get("class")
        elif tag == "svg" and self.current and self.figure:
            counts = self.sections[self.current]
            counts[self.figure] = counts.get(self.figure, 0) + 1


def test_html_report_has_both_figures_per_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib", reason="the figures need the html extra (matplotlib)")
    pytester.makepyfile(
        test_base=SUITE
        + """
@pytest.mark.throughput_floor(min_tokens_per_s=10)
@pytest.mark.no_regression(tokens_per_s=None)  # gated by its floor and SLOs only
@pytest.mark.latency_slo(ttft_p50_ms=2000, tpot_p50_ms=50)  # none over: 10 requests suffice
def test_gated(tokperf):
    tokperf.run(requests=10, max_tokens=16, warmup=0)  # an Offline floor's fewest
"""
    )
    _run(pytester, 200, "--tokperf-save-baseline", "base").assert_outcomes(passed=2)
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = _run(
        pytester, 150, "--tokperf-compare-baseline", "base", "--tokperf-html", "report.html"
    )
    result.assert_outcomes(passed=1, failed=1)
    page = (pytester.path / "report.html").read_text()
    assert "<script" not in page and "src=" not in page  # one self-contained file
    parser = _Figures()
    parser.feed(page)
    assert parser.sections == {
        "test_base.py::test_gated": {"throughput": 1, "latency": 1},
        "test_base.py::test_rate": {"throughput": 1, "latency": 1},
    }
    assert "baseline" in page and "floor" in page and "SLO p50 2,000 ms" in page
    # the GitHub step summary: the regression first
    rows = [line for line in summary.read_text().splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `test_base.py::test_rate` | **FAIL** |")
    assert "exceeds the allowed 10% drop" in summary.read_text()


def test_pytest_html_gets_the_figures_as_extras(pytester: pytest.Pytester) -> None:
    pytest.importorskip("matplotlib", reason="the figures need the html extra (matplotlib)")
    pytest.importorskip("pytest_html", reason="pytest-html is in the test extra")
    pytester.makepyfile(test_base=SUITE)
    result = _run(pytester, 200, "--html", "ph.html", "-p", "html")
    result.assert_outcomes(passed=1)
    page = (pytester.path / "ph.html").read_text()
    assert "throughput over time" in page and "latency CDF" in page


def test_the_profiles_tolerance_applies_unless_the_option_says(pytester: pytest.Pytester) -> None:
    """A profile's `max_regression` is the default tolerance; the option overrides it."""
    pytester.makepyfile(
        test_base="def test_rate(tokperf):\n    tokperf.run(requests=24, max_tokens=40, warmup=0)\n"
    )
    lax = PROFILE + "max_regression = 0.3\n"
    pytester.makefile(".toml", tokperf=lax.format(rate=200))
    pytester.runpytest(*ARGS, "--tokperf-save-baseline", "base").assert_outcomes(passed=1)
    pytester.makefile(".toml", tokperf=lax.format(rate=160))  # 20% slower
    pytester.runpytest(*ARGS, "--tokperf-compare-baseline", "base").assert_outcomes(passed=1)
    (check,) = _test(pytester)["regression"]["checks"]
    assert check["tolerance"] == 0.3 and check["low"] > 0.7 and check["high"] < 1
    strict = pytester.runpytest(
        *ARGS, "--tokperf-compare-baseline", "base", "--tokperf-max-regression", "0.05"
    )
    strict.assert_outcomes(failed=1)
    (check,) = _test(pytester)["regression"]["checks"]
    assert check["tolerance"] == 0.05 and check["status"] == "FAIL"
