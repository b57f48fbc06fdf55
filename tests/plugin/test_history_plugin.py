"""History on the sim engine: 12 runs of one suite through the plugin, 200 tokens/s for
r01-r06 and 150 from r07; `history` names r07 (its file, date and commit) and no other
run, from the results files and from the --tokperf-history store alike.

The sim engine runs one request at a time at a set per-request rate (wall clock), so
the two rates are one user profile whose engine setting changes (provenance, not key).
"""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest

from pytest_tokperf.__main__ import main

SUITE = """
def test_rate(tokperf):
    tokperf.run(requests=6, max_tokens=20, warmup=0)  # 0.6 s: a late wakeup is <1%
"""
PROFILE = """
[profiles.simrate]
extends = "sim"
engine = {{ tokens_per_s = {rate}, ttft_s = 0.0, jitter = 0.1, slots = 1 }}
"""
T_975_DF5 = 2.570582  # Student's t, 97.5% quantile, 5 degrees of freedom (tables)


def _twelve_runs(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    pytester.makepyfile(test_hist=SUITE)
    docs = []
    for n in range(1, 13):
        monkeypatch.setenv("GITHUB_SHA", f"c{n:02d}abcdef")
        pytester.makefile(".toml", tokperf=PROFILE.format(rate=200 if n < 7 else 150))
        html = ("--tokperf-html", "report.html") if n == 12 else ()
        result = pytester.runpytest(
            "--tokperf-profile", "simrate", "-p", "no:cacheprovider",
            "--tokperf-json", f"runs/r{n:02d}.json", "--tokperf-history", "runs", *html,
        )  # fmt: skip
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["history: 1 appended to runs"])
        docs.append(json.loads((pytester.path / "runs" / f"r{n:02d}.json").read_text()))
    return docs


def test_history_names_r07_and_no_other_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = _twelve_runs(pytester, monkeypatch)
    capsys.readouterr()  # the runs' own output
    rates = [d["tests"][0]["tokens_per_s"] for d in docs]
    assert docs[6]["commit"] == "c07abcdef"
    assert docs[0]["tests"][0]["hardware"]["kind"] == "cpu"
    (store,) = (pytester.path / "runs").glob("*.jsonl")
    assert len(store.read_text().splitlines()) == 12

    # the folder holds both the store and the results files: each run counts once
    code = main(["history", str(pytester.path / "runs"), "--metric", "tokens_per_s"])
    out = capsys.readouterr().out
    assert code == 1, out  # the newest change is a 25% drop, beyond 5%
    assert "tokens_per_s: 12 runs, 1 change point\n" in out
    assert re.findall(r"r\d\d\.json", out) == ["r07.json"]
    line = next(x for x in out.splitlines() if "r07.json" in x)
    assert f"({docs[6]['run']['started']}, commit c07abcdef)" in line
    assert "REGRESSION: the newest change is worse by more than 5%" in out

    # the printed means and intervals, computed here from the results files
    for side, values in (("before", rates[:6]), ("after", rates[6:])):
        mean = statistics.fmean(values)
        half = T_975_DF5 * statistics.stdev(values) / math.sqrt(6)
        shown = f"{mean:,.1f} (95% CI {mean - half:,.1f}..{mean + half:,.1f}, 6 runs)"
        assert shown in line, (side, shown, line)
    change = re.search(r"runs\), ([+-][\d.]+)%, p ([\d.e+-]+)$", line)
    assert change is not None, line
    drop = statistics.fmean(rates[6:]) / statistics.fmean(rates[:6]) - 1
    assert float(change[1]) == pytest.approx(drop * 100, abs=0.06)
    assert -30 < drop * 100 < -20 and float(change[2]) < 1e-6

    # the last run's HTML report: the trend, r07 marked, this run (r12) highlighted
    page = (pytester.path / "report.html").read_text()
    figure = page[page.index('<figure class="history">') :]
    figure = figure[: figure.index("</figure>")]
    assert "history: 12 runs, 1 change point<" in figure
    assert re.findall(r"r\d\d\.json", figure) == ["r07.json", "r12.json"]
    assert "this run (r12.json)" in figure

    # the store alone says the same
    (pytester.path / "store").mkdir()
    store.rename(pytester.path / "store" / store.name)
    assert main(["history", str(pytester.path / "store"), "--metric", "tokens_per_s"]) == 1
    assert re.findall(r"r\d\d\.json", capsys.readouterr().out) == ["r07.json"]

    # the first six runs alone: no change point, exit 0
    (pytester.path / "six").mkdir()
    for n in range(1, 7):
        (pytester.path / "runs" / f"r{n:02d}.json").rename(pytester.path / "six" / f"r{n:02d}.json")
    assert main(["history", str(pytester.path / "six")]) == 0
    out = capsys.readouterr().out
    assert "tokens_per_s: 6 runs, 0 change points" in out and "r0" not in out
