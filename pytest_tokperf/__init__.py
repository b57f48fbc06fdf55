"""pytest-tokperf: LLM inference performance acceptance tests as pytest markers.

Throughput floors, latency SLOs and accuracy parity; the fixtures `tokperf_engine`,
`tokperf` and `tokperf_reference_engine` and the markers `throughput_floor`, `latency_slo`
and `accuracy_parity` come from the plugin module, registered through `pytest11`.
"""

from __future__ import annotations

from importlib import metadata

from pytest_tokperf.accuracy import ParityResult, ParitySpec
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import (
    Chunk,
    Engine,
    EngineError,
    EngineInfo,
    LogitsEngine,
    Request,
    load_engine,
)
from pytest_tokperf.metrics import Distribution, Interval, RunResult, percentile
from pytest_tokperf.runner import Tokperf
from pytest_tokperf.workloads import Prompt, Workload, WorkloadError

try:
    __version__ = metadata.version("pytest-tokperf")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "Chunk",
    "Distribution",
    "Engine",
    "EngineError",
    "EngineInfo",
    "Interval",
    "LogitsEngine",
    "ParityResult",
    "ParitySpec",
    "Prompt",
    "Request",
    "RequestRecord",
    "RunResult",
    "Tokperf",
    "Workload",
    "WorkloadError",
    "__version__",
    "load_engine",
    "percentile",
]
