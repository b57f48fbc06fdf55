"""`python -m pytest_tokperf calibrate` on a sim suite: three real pytest runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUITE = """
def test_rate(tokperf):
    tokperf.run(requests=6, max_tokens=16, warmup=0)
"""


def test_calibrate_proposes_floors_and_saves_a_baseline(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_cal=SUITE)
    out = subprocess.run(
        [sys.executable, "-m", "pytest_tokperf", "calibrate", "test_cal.py", "-n", "3",
         "--out", "cal.toml", "--baseline", "base", "--", "--tokperf-profile", "sim"],
        cwd=pytester.path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = tomllib.loads((pytester.path / "cal.toml").read_text())
    table = doc["calibrated"]["test_cal.py::test_rate"]
    assert len(table["tokens_per_s_runs"]) == 3
    assert 0 < table["min_tokens_per_s"] < min(table["tokens_per_s_runs"])
    assert doc["profiles"]["sim-calibrated"]["floors"]["per_gpu"] == table["per_gpu"]
    assert len(list((pytester.path / "base").glob("*.json"))) == 1
