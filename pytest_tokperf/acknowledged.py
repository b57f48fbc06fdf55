"""Acknowledged regressions: `tokperf-acknowledged.toml` in the rootdir.

    [[regression]]
    test = "examples/test_llama2_70b_acceptance.py::test_offline_throughput_per_gpu"
    metric = "tokens_per_s"          # a no_regression keyword
    accepted = 150.0                 # tokens/s, or ms for a latency percentile
    reason = "q4_0 weights until the fused kernel lands (#123)"
    expires = 2027-01-31             # valid through this day

A regression of that test and metric is ACKNOWLEDGED while the entry is valid and the
observed value is no worse than `accepted` beyond the tolerance; after `expires` it
fails again, with the reason.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_tokperf.regression import KEYWORDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

FILENAME = "tokperf-acknowledged.toml"


@dataclass(frozen=True)
class Entry:
    test: str
    metric: str
    accepted: float  # tokens/s, or ms for a latency percentile
    reason: str
    expires: datetime.date

    def expired(self, today: datetime.date) -> bool:
        return today > self.expires


def load(rootdir: Path) -> list[Entry]:
    """The entries of rootdir/tokperf-acknowledged.toml (none when it does not exist)."""
    path = rootdir / FILENAME
    if not path.is_file():
        return []
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise pytest.UsageError(f"{path}: not valid TOML: {exc}") from None
    entries = doc.get("regression", [])
    if not isinstance(entries, list):
        raise pytest.UsageError(f"{path}: expected [[regression]] tables")
    return [_entry(e, f"{path}: [[regression]] number {i + 1}") for i, e in enumerate(entries)]


def _entry(table: Mapping[str, Any], where: str) -> Entry:
    keys = ("test", "metric", "accepted", "reason", "expires")
    missing = [k for k in keys if k not in table]
    unknown = sorted(set(table) - set(keys))
    if missing or unknown:
        raise pytest.UsageError(
            f"{where}: needs keys {', '.join(keys)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(unknown)}" if unknown else "")
        )
    if table["metric"] not in KEYWORDS:
        raise pytest.UsageError(
            f"{where}: metric {table['metric']!r} is not one of {', '.join(KEYWORDS)}"
        )
    accepted = table["accepted"]
    if isinstance(accepted, bool) or not isinstance(accepted, (int, float)) or accepted <= 0:
        raise pytest.UsageError(f"{where}: accepted must be a positive number, got {accepted!r}")
    expires = table["expires"]
    if isinstance(expires, datetime.datetime) or not isinstance(expires, datetime.date):
        raise pytest.UsageError(f"{where}: expires must be a TOML date such as 2027-01-31")
    if not isinstance(table["test"], str) or not isinstance(table["reason"], str):
        raise pytest.UsageError(f"{where}: test and reason must be strings")
    return Entry(table["test"], table["metric"], float(accepted), table["reason"], expires)


def find(entries: list[Entry], test: str, metric: str) -> Entry | None:
    """The entry for this test node id and metric, if any (the last one wins)."""
    found = [e for e in entries if e.test == test and e.metric == metric]
    return found[-1] if found else None
