"""Pure functions from request records to numbers (MLPerf Inference definitions).

No I/O and no formatting: `RunResult` is the single source of every number the
verdict, the terminal table and the JSON report show.

Percentiles follow MLPerf LoadGen: `sorted(values)[int(n * p)]`, no interpolation
(so the p99 of 64 samples is their maximum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import EngineInfo
from pytest_tokperf.gpus import Telemetry

NS = 1_000_000_000
PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99, "p999": 0.999}


def percentile(values: Sequence[float], p: float) -> float:
    """LoadGen's rule: the value at index int(n * p) of the sorted values."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"percentile {p} is outside [0, 1]")
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p), len(ordered) - 1)]


@dataclass(frozen=True)
class Distribution:
    """Percentiles of one per-request latency, in seconds (None: no samples)."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    p999: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None, None, None)
        points = {name: percentile(values, p) for name, p in PERCENTILES.items()}
        return cls(count=len(values), mean=sum(values) / len(values), **points)


def ttft_s(record: RequestRecord) -> float | None:
    """Time to first token: first chunk time - issue time."""
    first = record.first_chunk_ns
    return None if first is None else (first - record.issue_ns) / NS


def e2e_s(record: RequestRecord) -> float:
    """End-to-end latency: completion time - issue time."""
    return (record.end_ns - record.issue_ns) / NS


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first: (latency - TTFT) / (tokens - 1)."""
    first = record.first_chunk_ns
    if first is None or record.output_tokens < 2:
        return None
    return (record.end_ns - first) / NS / (record.output_tokens - 1)


def span_ns(records: Sequence[RequestRecord]) -> int:
    """First issue to last completion: the span MLPerf's Offline rate is taken over."""
    if not records:
        return 0
    return max(r.end_ns for r in records) - min(r.issue_ns for r in records)


def output_tokens_per_s(records: Sequence[RequestRecord]) -> float:
    """MLPerf Offline: output tokens of the completed requests / (last end - first issue)."""
    span = span_ns(records)
    tokens = sum(r.output_tokens for r in records if r.ok)
    return tokens * NS / span if span > 0 else 0.0


@dataclass(frozen=True)
class RunResult:
    """One measured run: its settings, its records and every number derived from them."""

    scenario: str
    workload: str
    max_tokens: int | None
    engine: EngineInfo
    records: tuple[RequestRecord, ...]
    requests: int
    failed: int
    output_tokens: int
    duration_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    requests_per_s: float
    tokens_per_sample: float
    ttft: Distribution
    tpot: Distribution
    e2e: Distribution
    # from the telemetry sampled during the run (None: not measured on this hardware)
    telemetry: Telemetry | None = None
    energy_j_per_token: float | None = None  # all allocated GPUs' energy / output tokens
    tokens_per_s_per_watt: float | None = None  # tokens/s / mean power of those GPUs
    throttled: bool | None = None  # the GPUs slowed their clocks during the run
    client_busy_cores: float | None = None  # this process's CPU time / run time

    @property
    def errors(self) -> list[str]:
        return [f"{r.id}: {r.error}" for r in self.records if r.error is not None]


def summarize(
    records: Sequence[RequestRecord],
    engine: EngineInfo,
    *,
    scenario: str,
    workload: str,
    max_tokens: int | None,
) -> RunResult:
    """Every number of a run, from its records alone."""
    ok = [r for r in records if r.ok]
    span = span_ns(records)
    duration = span / NS
    tokens = sum(r.output_tokens for r in ok)
    rate = output_tokens_per_s(records)
    return RunResult(
        scenario=scenario,
        workload=workload,
        max_tokens=max_tokens,
        engine=engine,
        records=tuple(records),
        requests=len(records),
        failed=len(records) - len(ok),
        output_tokens=tokens,
        duration_s=duration,
        tokens_per_s=rate,
        tokens_per_s_per_gpu=rate / engine.devices,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        tokens_per_sample=tokens / len(ok) if ok else 0.0,
        ttft=Distribution.of([v for r in ok if (v := ttft_s(r)) is not None]),
        tpot=Distribution.of([v for r in ok if (v := tpot_s(r)) is not None]),
        e2e=Distribution.of([e2e_s(r) for r in ok]),
    )


def energy_per_token(energy_j: float | None, output_tokens: int) -> float | None:
    """Joules per output token over the run; None without an energy reading or tokens."""
    if energy_j is None or output_tokens <= 0:
        return None
    return energy_j / output_tokens


def tokens_per_watt(tokens_per_s: float, mean_power_w: float | None) -> float | None:
    """Output tokens/s per watt drawn by the GPUs (= tokens per joule)."""
    if mean_power_w is None or mean_power_w <= 0:
        return None
    return tokens_per_s / mean_power_w


def with_telemetry(result: RunResult, telemetry: Telemetry) -> RunResult:
    """`result` with the numbers derived from the telemetry of its run."""
    gpu = telemetry.gpu
    return replace(
        result,
        telemetry=telemetry,
        energy_j_per_token=energy_per_token(gpu.energy_j if gpu else None, result.output_tokens),
        tokens_per_s_per_watt=tokens_per_watt(
            result.tokens_per_s, gpu.mean_power_w if gpu else None
        ),
        throttled=gpu.throttled if gpu else None,
        client_busy_cores=telemetry.cpu.busy_cores,
    )
