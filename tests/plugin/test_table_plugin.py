"""The terminal summary table: at most 120 characters a line by default, whole under
`-v` or `--tokperf-table wide` (issue 25)."""

from __future__ import annotations

import pytest

SIM = ("-p", "no:cacheprovider", "--tokperf-profile", "sim", "--tokperf-requests", "4",
       "--tokperf-max-tokens", "4")  # fmt: skip
NODEID = (
    "acceptance_suite_of_the_llama2_70b_deployment/"
    "test_llama2_70b_acceptance.py::test_offline_throughput_per_node_longer_answers"
)
SUITE = """
def test_offline_throughput_per_node_longer_answers(tokperf):  # no floor: measured
    tokperf.run(warmup=0)
"""


def _summary(result: pytest.RunResult) -> list[str]:
    """The lines of the tokperf section of the terminal summary (none of them empty)."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if "= tokperf =" in line) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("=")), len(lines))
    return [line for line in lines[start:end] if line]


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    folder = pytester.mkdir(NODEID.split("/")[0])
    (folder / NODEID.split("/")[1].split("::")[0]).write_text(SUITE)
    return pytester


def test_the_summary_table_fits_120_characters_by_default(suite: pytest.Pytester) -> None:
    result = suite.runpytest(*SIM)
    result.assert_outcomes(passed=1)
    header, row, footnote, *_ = _summary(result)
    assert max(len(line) for line in (header, row, footnote)) <= 120
    assert header.split()[0] == "test" and header.endswith("verdict")
    assert row.startswith("test_offline_throughput_per_node_longer_answers ")
    assert row.endswith("  MEASURED")
    # per device repeats tokens/s on one device; then the directory and file; then proc CPU
    assert footnote == "-v or --tokperf-table wide shows per device, whole test ids, proc CPU"
    assert header.split() == [
        "test", "scenario", "requests", "tokens/s", "floor", "TTFT", "p99", "TPOT", "p99",
        "verdict",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "wide", [("-v",), ("--tokperf-table", "wide"), ("-o", "tokperf_table=wide")]
)
def test_verbose_or_wide_shows_the_whole_table(suite: pytest.Pytester, wide: tuple) -> None:
    result = suite.runpytest(*SIM, *wide)
    result.assert_outcomes(passed=1)
    header, row, *rest = _summary(result)
    assert row.startswith(NODEID + " ") and row.endswith("  MEASURED")
    assert header.split()[:4] == ["test", "scenario", "requests", "tokens/s"]
    assert "proc CPU" in header and len(row) > 120
    assert not any(line.startswith("-v or --tokperf-table") for line in rest)
