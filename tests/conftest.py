"""Shared test setup.

pytester's in-process runs drop modules first imported inside them; numpy (under
llama_cpp) cannot be imported twice in one process, so import it here, once (and
matplotlib, whose classes would no longer match their re-imported selves, and scipy and
ruptures, the history's change points, whose extensions load once too).
Tests marked `gpu` need the real NVML and a GPU; elsewhere they skip, saying why.
Every test runs with `TOKPERF_MIN_DURATION=0` and `TOKPERF_BUSY_MACHINE=note` (see
`_short_runs_judged`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401
with contextlib.suppress(ImportError):  # likewise matplotlib (the HTML report's figures)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
with contextlib.suppress(ImportError):
    import ruptures  # noqa: F401
    import scipy.stats  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def _short_runs_judged() -> Iterator[None]:
    """The suites these tests run are short on purpose (seconds, not the 10 s a cpu or
    sim profile's judged run must last), and they run their own servers and loads
    beside the engine (a server the outer test started is no neighbour of the inner
    run); the tests of the minimum and of a busy machine set those themselves. Session
    scope: before any module's fixture starts a run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKPERF_MIN_DURATION", "0")
        mp.setenv("TOKPERF_BUSY_MACHINE", "note")
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import pynvml

    from pytest_tokperf.hardware.inventory import read_inventory

    inventory = read_inventory(pynvml)  # the real NVML, never a recording
    if inventory.gpus:
        return
    skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU; this machine: {inventory.describe()}")
    for item in marked:
        item.add_marker(skip)
