"""`python -m pytest_tokperf calibrate examples -n 5`: floors from measured noise.

Runs the suite N times (a pytest subprocess each, with --tokperf-json) and proposes per
test the throughput floor and latency limits the unchanged system would meet with a
chosen probability: a **one-sided normal tolerance bound on the log scale** (rates and
latencies are positive and their spread is multiplicative), with the tolerance factor k
from the noncentral t distribution:

    floor = exp(mean(log x) - k * sd(log x)),  limit = exp(mean(log x) + k * sd(log x))

so that, at the stated confidence, at least `probability` of future runs lie on the
passing side. It also proposes a `no_regression` tolerance from the between-run drift:
the drop of one run against another that the unchanged system stays within with that
probability, and at least the drop the comparison's own interval reaches when each
run is compared with the one before it (as `--tokperf-compare-baseline` would judge
it): a tolerance narrower than that interval leaves an unchanged engine INCONCLUSIVE.
The result is a `tokperf.toml` snippet (a profile extending the suite's
with the lowest per-test floor, and a `[calibrated."<test id>"]` table per test).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import platform
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from pytest_tokperf import regression

COMPARED_AT = 0.95  # the plugin's default --tokperf-confidence

LATENCY_KEYS = (("ttft_s", "p99", "ttft_p99_ms"), ("tpot_s", "p99", "tpot_p99_ms"))


def _noncentral_t_cdf(t: float, df: int, delta: float, steps: int = 4000) -> float:
    """P(T <= t) for T = (Z + delta) / sqrt(V / df), V ~ chi-square(df): the mean over V
    of Phi(t sqrt(V / df) - delta), by the midpoint rule on V's quantile scale."""
    phi = NormalDist().cdf
    # V = df * S^2 with S^2 ~ Gamma(df/2, 2/df); sample its quantiles through the
    # Wilson-Hilferty cube-root normal approximation, close enough for df >= 2
    z = NormalDist().inv_cdf
    a = 2 / (9 * df)
    total = 0.0
    for i in range(steps):
        q = z((i + 0.5) / steps)
        s2 = max(0.0, 1 - a + q * math.sqrt(a)) ** 3  # V / df
        total += phi(t * math.sqrt(s2) - delta)
    return total / steps


def tolerance_factor(n: int, probability: float, confidence: float) -> float:
    """One-sided normal tolerance factor k: with `confidence`, a fraction `probability`
    of the population lies above mean - k sd (and below mean + k sd). Exactly
    k = t'_confidence(n - 1, z_probability sqrt(n)) / sqrt(n), t' the noncentral t
    quantile, found by bisection. Needs n >= 3."""
    if n < 3:
        raise ValueError(f"a tolerance bound needs at least 3 runs, got {n}")
    delta = NormalDist().inv_cdf(probability) * math.sqrt(n)
    low, high = delta, delta * 20 + 20
    for _ in range(60):
        mid = (low + high) / 2
        if _noncentral_t_cdf(mid, n - 1, delta, 800) < confidence:
            low = mid
        else:
            high = mid
    return (low + high) / 2 / math.sqrt(n)


USABLE = ("PASS", "MEASURED")


@dataclass(frozen=True)
class Proposal:
    test: str
    profile: str
    runs: int
    tokens_per_s: tuple[float, ...]
    floor: float  # tokens/s
    per_gpu_floor: float
    limits_ms: dict[str, float]  # latency_slo keyword -> proposed limit
    max_regression: float  # no_regression tokens_per_s tolerance


def _log_stats(values: Sequence[float]) -> tuple[float, float]:
    logs = [math.log(v) for v in values]
    mean = sum(logs) / len(logs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
    return mean, sd


def propose(
    runs: Sequence[Mapping[str, Any]], probability: float, confidence: float
) -> list[Proposal]:
    """Per test seen with a positive rate in at least 3 of the runs' JSON documents."""
    by_test: dict[str, list[Mapping[str, Any]]] = {}
    for doc in runs:
        for p in doc["tests"]:
            # floors from runs that passed or only measured: a failed or invalid run's
            # rate is not the engine's
            if p.get("kind") is None and p["verdict"] in USABLE and p["tokens_per_s"] > 0:
                by_test.setdefault(p["nodeid"], []).append(p)
    out = []
    for test, payloads in sorted(by_test.items()):
        if len(payloads) < 3:
            continue
        k = tolerance_factor(len(payloads), probability, confidence)
        rates = [p["tokens_per_s"] for p in payloads]
        mean, sd = _log_stats(rates)
        devices = payloads[0]["engine"]["devices"]
        floor = math.exp(mean - k * sd)
        limits = {}
        for field, pct, keyword in LATENCY_KEYS:
            values = [v for p in payloads if (v := p[field][pct]) is not None and v > 0]
            if len(values) == len(payloads):
                lm, ls = _log_stats(values)
                limits[keyword] = math.exp(lm + k * ls) * 1000
        # one run against another: log ratio sd = sqrt(2) sd
        drop = 1 - math.exp(-k * math.sqrt(2) * sd)
        # each run against the one before: the low end of the comparison's interval
        for before, after in itertools.pairwise(payloads):
            for check in regression.compare(after, before, {regression.THROUGHPUT: 0}, COMPARED_AT):
                if check.low is not None:
                    drop = max(drop, 1 - check.low)
        out.append(
            Proposal(
                test,
                payloads[0]["profile"],
                len(payloads),
                tuple(rates),
                floor,
                floor / devices,
                limits,
                drop,
            )
        )
    return out


def _g(x: float) -> str:
    return f"{x:.4g}"


def toml(proposals: Sequence[Proposal], probability: float, confidence: float, command: str) -> str:
    """The tokperf.toml snippet."""
    if not proposals:
        return "# no perf test ran in at least 3 runs: nothing to calibrate\n"
    n = proposals[0].runs
    k = tolerance_factor(n, probability, confidence)
    profile = proposals[0].profile
    lowest = min(p.per_gpu_floor for p in proposals)
    lines = [
        f"# pytest-tokperf calibrate: {n} runs of `{command}` on {platform.node()}, "
        f"{datetime.date.today().isoformat()}",
        "# one-sided normal tolerance bounds on the log scale (k = "
        f"{k:.3f} for n = {n}): with {confidence:.0%} confidence, {probability:.0%} of runs",
        "# of the unchanged system reach each floor and stay under each limit.",
        f"[profiles.{profile}-calibrated]",
        f'extends = "{profile}"',
        f"floors = {{ per_gpu = {_g(lowest)} }}  # the lowest per-test floor below",
        "",
    ]
    for p in proposals:
        limits = ", ".join(f"{k} = {_g(v)}" for k, v in p.limits_ms.items())
        lines += [
            f'[calibrated."{p.test}"]',
            f"tokens_per_s_runs = [{', '.join(_g(r) for r in p.tokens_per_s)}]",
            f"min_tokens_per_s = {_g(p.floor)}",
            f"per_gpu = {_g(p.per_gpu_floor)}",
            *([f"latency_slo = {{ {limits} }}"] if limits else []),
            f"no_regression = {{ tokens_per_s = {p.max_regression:.3f} }}",
            "",
        ]
    return "\n".join(lines)


def run_suite(
    paths: Sequence[str], runs: int, extra: Sequence[str], baseline: str | None, folder: Path
) -> list[dict[str, Any]]:
    """The suite's JSON documents, one per run (a run that wrote none is left out)."""
    docs = []
    for i in range(runs):
        out = folder / f"run-{i}.json"
        cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider",
               "--tokperf-json", str(out), *extra]  # fmt: skip
        # a baseline saved every run puts the window rates in its JSON (the comparison's
        # interval needs them); the last run's, when asked, is the one kept
        keep = baseline if baseline is not None and i == runs - 1 else None
        cmd += ["--tokperf-save-baseline", keep or str(folder / f"base-{i}")]
        print(f"calibrate: run {i + 1}/{runs}: {' '.join(cmd[1:])}", file=sys.stderr)
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
        if out.is_file():
            docs.append(json.loads(out.read_text(encoding="utf-8")))
    return docs


def main(args: Any) -> int:
    """The `calibrate` command: run, propose, print or write the snippet."""
    with tempfile.TemporaryDirectory(prefix="tokperf-calibrate-") as tmp:
        docs = run_suite(args.paths, args.n, args.pytest_args, args.baseline, Path(tmp))
    if len(docs) < 3:
        print(f"calibrate: only {len(docs)} runs wrote results; need at least 3", file=sys.stderr)
        return 1
    proposals = propose(docs, args.probability, args.confidence)
    command = "pytest " + " ".join([*args.paths, *args.pytest_args])
    text = toml(proposals, args.probability, args.confidence, command)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"calibrate: wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0
