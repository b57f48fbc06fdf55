"""Store, key and compare baselines: one JSON file per test and key under a directory.

A baseline is keyed by what must be equal for a comparison to mean anything: test id,
profile, hardware fingerprint (GPU model and count, or CPU model and cores), model,
precision, workload and scenario. Engine versions and settings, driver, clocks, git
commit and date are stored as provenance, not keys: a new engine build or setting is
exactly what a comparison is for. A baseline whose keys differ is never compared; the
test says which keys differ.

The statistics are `regression`'s; acknowledged regressions are `acknowledged`'s.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_tokperf import acknowledged, metrics, regression, verdict
from pytest_tokperf.hardware.inventory import Inventory
from pytest_tokperf.metrics import RunResult

SCHEMA = "pytest-tokperf/baseline/1"
KEYS = ("test", "profile", "hardware", "model", "precision", "workload", "scenario")
TIMELINE_WINDOWS = 50  # for the throughput-over-time figure only
CDF_POINTS = 200  # a baseline's latency CDF, as quantiles, in the payload


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device_kind: str, inventory: Inventory, uuids: Sequence[str]) -> dict[str, Any]:
    """The fingerprint: GPU model and count of the allocation, or CPU model and cores
    of the machine (not this process's affinity: a pinned deployment is a setting)."""
    if device_kind == "gpu" and uuids:
        names = sorted({g.name for g in inventory.gpus if g.uuid in uuids}) or ["unknown GPU"]
        return {"kind": "gpu", "model": " + ".join(names), "count": len(uuids)}
    return {"kind": "cpu", "model": cpu_model(), "count": os.cpu_count() or 1}


def describe_hardware(hw: Mapping[str, Any]) -> str:
    """'Intel(R) Xeon(R) Processor x2', '4 x NVIDIA GB300'."""
    if hw.get("kind") == "gpu":
        return f"{hw['count']} x {hw['model']}"
    return f"{hw['model']} x{hw['count']}"


def _round(values: Sequence[float], digits: int = 6) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in values]


def extras(result: RunResult, hw: Mapping[str, Any], latencies: bool) -> dict[str, Any]:
    """Additive payload keys: the hardware fingerprint, the batch-means window rates (an
    Offline run's also in windows of equal work), a finer timeline for figures, and
    (when asked) every request's latencies in ms."""
    end = result.window_end_ns
    out: dict[str, Any] = {
        "hardware": dict(hw),
        "windows_per_s": _round(metrics.window_rates(result.records, metrics.BATCHES, end)),
        "timeline_per_s": _round(metrics.window_rates(result.records, TIMELINE_WINDOWS, end), 4),
    }
    if result.scenario == "offline":  # the same requests each time: windows of equal work
        out["token_windows_per_s"] = _round(metrics.token_windows(result.records, metrics.BATCHES))
    if latencies:
        ok = [r for r in result.records if r.ok]
        out["latencies_ms"] = {
            "ttft": [round(v * 1000, 3) for r in ok if (v := metrics.ttft_s(r)) is not None],
            "tpot": [round(v * 1000, 4) for r in ok if (v := metrics.tpot_s(r)) is not None],
            "e2e": [round(metrics.e2e_s(r) * 1000, 3) for r in ok],
        }
    return out


def key(payload: Mapping[str, Any]) -> dict[str, str]:
    """The baseline key of a perf payload (with `hardware` from `extras`)."""
    engine = payload["engine"]
    load = ""
    if payload.get("qps") is not None:
        load = f" qps {payload['qps']:g}"
    elif payload.get("concurrency") is not None:
        load = f" concurrency {payload['concurrency']}"
    return {
        "test": payload["nodeid"],
        "profile": payload["profile"],
        "hardware": describe_hardware(payload["hardware"]),
        "model": engine["model"],
        "precision": engine["precision"],
        "workload": f"{payload['workload']} max_tokens {payload['max_tokens']}",
        "scenario": f"{payload['scenario']}{load}",
    }


def _slug(nodeid: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")
    return slug[:120] + "-" + hashlib.sha1(nodeid.encode()).hexdigest()[:8]


def path_for(directory: Path, k: Mapping[str, str]) -> Path:
    digest = hashlib.sha1(json.dumps(k, sort_keys=True).encode()).hexdigest()[:10]
    return directory / f"{_slug(k['test'])}--{digest}.json"


def git_commit(rootdir: Path) -> str | None:
    """GITHUB_SHA in Actions, else the rootdir's git HEAD (None outside a repository)."""
    if os.environ.get("GITHUB_SHA"):
        return os.environ["GITHUB_SHA"]
    try:
        out = subprocess.run(
            ["git", "-C", str(rootdir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(
    payload: Mapping[str, Any], inventory: Inventory, commit: str | None
) -> dict[str, Any]:
    """What the baseline ran with, stored but never keyed."""
    gpu = (payload.get("telemetry") or {}).get("gpu") or {}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "engine_versions": payload["engine"].get("versions", {}),
        "engine_settings": payload["engine"].get("settings", {}),
        "driver": inventory.driver,
        "cuda": inventory.cuda,
        "clocks": {k: gpu.get(k) for k in ("min_sm_clock_mhz", "mean_sm_clock_mhz")},
        "python": platform.python_version(),
        "host": platform.node(),
    }


def save(directory: Path, payload: Mapping[str, Any], prov: Mapping[str, Any]) -> Path:
    """Write (atomically) the baseline of one perf payload; returns its path."""
    k = key(payload)
    path = path_for(directory, k)
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "key": k, "provenance": dict(prov), "payload": dict(payload)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def candidates(directory: Path, test: str) -> list[dict[str, Any]]:
    """Every baseline document stored for this test id, whatever its other keys."""
    out = []
    for path in sorted(directory.glob(f"{_slug(test)}--*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("schema") == SCHEMA and doc["key"]["test"] == test:
            out.append({**doc, "path": str(path)})
    return out


def differences(want: Mapping[str, str], have: Mapping[str, str]) -> list[str]:
    """ "hardware 'A x8' (here 'B x2')" for each key that differs."""
    return [f"{k} {have.get(k)!r} (here {want[k]!r})" for k in KEYS if have.get(k) != want[k]]


def tolerances(marker: Mapping[str, float | None] | None, default: float) -> dict[str, float]:
    """Metric -> allowed relative change: tokens/s at the default unless the marker says
    otherwise (None turns a metric off), plus every latency the marker names."""
    out: dict[str, float] = {regression.THROUGHPUT: default}
    for metric, value in (marker or {}).items():
        if value is None:
            out.pop(metric, None)
        else:
            out[metric] = value
    return out


@dataclass
class Baselines:
    """Baseline saving and comparison for one session (None directories: off)."""

    save_dir: Path | None
    compare_dir: Path | None
    tolerance: float
    confidence: float
    rootdir: Path
    inventory: Inventory
    entries: list[acknowledged.Entry] = field(default_factory=list)
    want_latencies: bool = False  # the HTML report also needs them
    today: datetime.date = field(default_factory=datetime.date.today)
    _commit: str | None = None

    @property
    def active(self) -> bool:
        return self.save_dir is not None or self.compare_dir is not None or self.want_latencies

    def extras(
        self, payload: Mapping[str, Any], result: RunResult, uuids: Sequence[str]
    ) -> dict[str, Any]:
        """The measurement's extra keys a baseline needs (none when baselines are off)."""
        if not self.active:
            return {}
        return extras(result, hardware(payload["device_kind"], self.inventory, uuids), True)

    def save(self, payload: Mapping[str, Any]) -> str:
        """Store a judged payload as its test's baseline; the caller saves only payloads
        whose verdict has no FAIL or INVALID check. Returns the file's path."""
        assert self.save_dir is not None
        if self._commit is None:
            self._commit = git_commit(self.rootdir) or ""
        prov = provenance(payload, self.inventory, self._commit or None)
        stored = {k: v for k, v in payload.items() if k != "regression"}
        return str(save(self.save_dir, stored, prov))

    def find(
        self,
        run: Mapping[str, Any],
        uuids: Sequence[str],
        marker: Mapping[str, float | None] | None,
    ) -> tuple[dict[str, Any], dict[str, float]] | None:
        """Before a run: its stored baseline payload and tolerances, for early stopping
        to decide the comparison too (`run`: a payload's keys, without `hardware`)."""
        if self.compare_dir is None:
            return None
        hw = hardware(run["device_kind"], self.inventory, uuids)
        want = key({**run, "hardware": hw})
        same = [d for d in candidates(self.compare_dir, want["test"]) if d["key"] == want]
        return (same[0]["payload"], tolerances(marker, self.tolerance)) if same else None

    def compare(
        self, payload: Mapping[str, Any], marker: Mapping[str, float | None] | None
    ) -> dict[str, Any]:
        """The `regression` block of the payload: compared or why not."""
        assert self.compare_dir is not None
        tol = tolerances(marker, self.tolerance)
        want = key(payload)
        found = candidates(self.compare_dir, want["test"])
        same = [d for d in found if d["key"] == want]
        if not same:
            if not found:
                why = f"no baseline for this test in {self.compare_dir}"
            else:
                closest = min(found, key=lambda d: len(differences(want, d["key"])))
                why = "the stored baseline has other keys: " + ", ".join(
                    differences(want, closest["key"])
                )
            return {"compared": False, "status": "NO BASELINE", "reason": why}
        doc = same[0]
        base = doc["payload"]
        checks = regression.compare(payload, base, tol, self.confidence)
        rows = [self._acknowledge(payload["nodeid"], c) for c in checks]
        return {
            "compared": True,
            "status": regression.overall([r["status"] for r in rows]),
            "confidence": self.confidence,
            "baseline": {
                "path": doc["path"],
                "key": doc["key"],
                "provenance": doc["provenance"],
                "tokens_per_s": base.get("tokens_per_s"),
                "timeline_per_s": base.get("timeline_per_s"),
                "duration_s": base.get("duration_s"),
                "cdf_ms": {
                    name: quantiles(values, CDF_POINTS)
                    for name, values in (base.get("latencies_ms") or {}).items()
                },
            },
            "checks": rows,
        }

    def _acknowledge(self, test: str, check: regression.Check) -> dict[str, Any]:
        row = {**check.__dict__}
        if check.status not in ("FAIL", "INCONCLUSIVE"):
            return row
        entry = acknowledged.find(self.entries, test, check.metric)
        if entry is None:
            return row
        # latencies are accepted in ms, observed in s
        observed = check.observed if check.metric == regression.THROUGHPUT else check.observed * 1e3
        if regression.higher_is_better(check.metric):
            within = observed >= entry.accepted * (1 - check.tolerance)
        else:
            within = observed <= entry.accepted * (1 + check.tolerance)
        when = entry.expires.isoformat()
        if entry.expired(self.today):
            row["status"] = "FAIL"
            row["note"] = f"acknowledged until {when}, expired: {entry.reason}"
        elif not within:
            row["status"] = "FAIL"
            row["note"] = f"worse than the acknowledged {entry.accepted:g} ({entry.reason})"
        else:
            row["status"] = "ACKNOWLEDGED"
            row["note"] = f"accepted at {entry.accepted:g} until {when}: {entry.reason}"
        return row


def quantiles(values: Sequence[float], points: int) -> list[float]:
    """`points` evenly spaced quantiles of `values` (all of them when fewer)."""
    ordered = sorted(values)
    if len(ordered) <= points:
        return ordered
    return [ordered[round(i * (len(ordered) - 1) / (points - 1))] for i in range(points)]


MISSING_POLICIES = ("fail", "inconclusive", "pass")
_MISSING = {"fail": "FAIL", "inconclusive": "INCONCLUSIVE", "pass": "NOT MEASURED"}


def checks(block: Mapping[str, Any], missing: str) -> list[verdict.Check]:
    """The regression block as checks of the one judgment: one per compared metric, or
    one `baseline` check saying none was found (its status set by `missing`, from
    --tokperf-baseline-missing: nothing compared is never a pass)."""
    if not block["compared"]:
        return [verdict.check("baseline", _MISSING[missing], "baseline", block["reason"])]
    out = []
    for row in block["checks"]:
        status = {"IMPROVED": "PASS"}.get(row["status"], row["status"])
        up = regression.higher_is_better(row["metric"])
        worse = 1 - row["tolerance"] if up else 1 + row["tolerance"]  # the limit of the ratio
        out.append(
            verdict.check(
                row["metric"],
                status,
                "regression",
                row.get("note", ""),
                observed=row["ratio"],
                limit=worse,
                ci_low=row["low"],
                ci_high=row["high"],
                confidence=block["confidence"],
            )
        )
    return out
