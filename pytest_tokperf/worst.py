"""Worst-workload search: hypothesis over workload shapes, shrunk to the smallest shape
whose run breaks an SLO (`tokperf.search_worst`).

A shape is a prompt length (in whitespace-separated words: the sim engine's tokens, about
a token each on a real tokenizer), an answer length and a request rate, each fixed or a
hypothesis strategy. Each example is a short Server run of `requests` requests of that
shape at that rate; it breaks the SLOs when `verdict.judge` of it against them alone
is FAIL (an observed percentile over its limit, or a failed request): the one judging
path, so a run that only lacked samples breaks nothing. Hypothesis then shrinks the
failing shape (integers toward their lower bounds), so the shape reported is the
smallest it found to fail, near the boundary where the SLO starts to break.

Every shape's outcome is remembered: hypothesis's replay of the shrunk example reads
it instead of a new, noisy run, and once `budget_s` is spent new shapes are not run
and count as not breaking (the search keeps the smallest failure found so far). The
result is written as a workload file (JSONL, `workloads`) and a JSON file beside it
with the rate, the seed and the call that reproduces the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_tokperf import markers, verdict, workloads
from pytest_tokperf.metrics import RunResult

if TYPE_CHECKING:
    from pytest_tokperf.runner import Tokperf

WORD = "tok"
Shape = tuple[int, int, float]  # prompt tokens, output tokens, qps


@dataclass(frozen=True)
class Worst:
    """A search's outcome: the smallest breaking shape found (None: none broke)."""

    slos: dict[str, float]
    shape: dict[str, Any] | None  # prompt_tokens, output_tokens, qps, requests, seed
    why: str  # the breaking run's failed checks, in words
    result: RunResult | None  # the breaking run
    tried: int  # shapes run
    seconds: float
    stopped: str  # "searched" or "budget"
    workload_path: Path | None = None
    outcomes: dict[Shape, str] = field(default_factory=dict)  # every shape run: its status

    def to_json(self) -> dict[str, Any]:
        return {
            "slos_ms": self.slos, "shape": self.shape, "why": self.why, "tried": self.tried,
            "seconds": self.seconds, "stopped": self.stopped,
            "workload": None if self.workload_path is None else str(self.workload_path),
        }  # fmt: skip


def prompt_of(tokens: int) -> str:
    return " ".join([WORD] * tokens)


def shape_workload(prompt_tokens: int, output_tokens: int) -> workloads.Workload:
    name = f"worst-p{prompt_tokens}-o{output_tokens}"
    prompt = workloads.Prompt(f"{name}-0", prompt_of(prompt_tokens), output_tokens)
    return workloads.Workload(name, (prompt,))


def _strategy(name: str, value: object, kind: type) -> Any:
    """A hypothesis strategy as given, or a fixed value made one."""
    from hypothesis import strategies as st

    if isinstance(value, st.SearchStrategy):
        return value
    number = verdict.finite(value)
    if number is None or number <= 0 or (kind is int and not isinstance(value, int)):
        what = "a positive integer" if kind is int else "a positive number"
        raise ValueError(
            f"tokperf.search_worst({name}={value!r}): expected {what} or a hypothesis "
            f"strategy such as st.integers(1, 2048)"
        )
    return st.just(value)


def search_worst(
    runner: Tokperf,
    slo: Mapping[str, float],
    *,
    prompt_tokens: object,
    output_tokens: object = 16,
    qps: object = 5.0,
    requests: int = 20,
    budget_s: float = 120.0,
    max_examples: int = 200,
    seed: int = 0,
    path: str | Path = "tokperf-worst.jsonl",
    scenario: str = "server",
) -> Worst:
    """The smallest workload shape that breaks `slo` (module docstring)."""
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hypothesis_seed
    except ModuleNotFoundError:  # pragma: no cover - hypothesis is a test dependency
        raise ValueError("tokperf.search_worst needs hypothesis: pip install hypothesis") from None
    call = "tokperf.search_worst"
    try:
        markers.parse_slo_marker((), dict(slo), f"{call}(slo=...)", ())
    except Exception as exc:
        raise ValueError(str(exc)) from None
    if not slo:
        raise ValueError(f"{call}(slo=...): give at least one limit, e.g. {{'ttft_p50_ms': 500}}")
    if scenario not in ("server", "interactive"):
        raise ValueError(f"{call}(scenario={scenario!r}): expected server or interactive")
    for name, value in (("requests", requests), ("max_examples", max_examples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{call}({name}={value!r}): expected a positive integer")
    if (verdict.finite(budget_s) or 0) <= 0:
        raise ValueError(f"{call}(budget_s={budget_s!r}): expected a positive number of seconds")
    strategies = (
        _strategy("prompt_tokens", prompt_tokens, int),
        _strategy("output_tokens", output_tokens, int),
        _strategy("qps", qps, float),
    )
    limits = dict(slo)
    outcomes: dict[Shape, str] = {}
    broken: dict[Shape, tuple[str, RunResult]] = {}
    began = time.monotonic()
    over = [False]

    def outcome(shape: Shape) -> str:
        if shape in outcomes:
            return outcomes[shape]
        if time.monotonic() - began > budget_s:
            over[0] = True
            return "NOT RUN"  # out of budget: breaks nothing
        p, o, rate = shape
        result = runner.run(scenario, requests, None, shape_workload(p, o), qps=rate, seed=seed,
                            warmup=0, min_duration_s=0)  # fmt: skip
        judged = verdict.judge(result, {}, limits, busy=runner.busy, throttled=runner.throttled)
        outcomes[shape] = judged.status
        if judged.status == "FAIL":
            why = "; ".join(_said(c) for c in judged.checks if c.status == "FAIL")
            broken[shape] = (why, result)
        return judged.status

    @settings(database=None, deadline=None, max_examples=max_examples, derandomize=False,
              phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck),
              print_blob=False)  # fmt: skip
    @hypothesis_seed(seed)
    @given(*strategies)
    def holds(p: int, o: int, rate: float) -> None:
        assert outcome((p, o, float(rate))) != "FAIL"

    runner.probing = True  # the search's runs are not the test's runs
    try:
        holds()
    except AssertionError:
        pass  # hypothesis found (and shrank) a breaking shape: it is in `broken`
    finally:
        runner.probing = False
    seconds = time.monotonic() - began
    stopped = "budget" if over[0] else "searched"
    if not broken:
        return Worst(limits, None, "", None, len(outcomes), seconds, stopped, None, outcomes)
    smallest = min(broken)  # the shrunk example: the least prompt, then answer, then rate
    why, result = broken[smallest]
    p, o, rate = smallest
    shape = {"prompt_tokens": p, "output_tokens": o, "qps": rate, "requests": requests,
             "seed": seed, "scenario": scenario}  # fmt: skip
    out = write(Path(path), shape, limits, why)
    return Worst(limits, shape, why, result, len(outcomes), seconds, stopped, out, outcomes)


def _said(c: verdict.Check) -> str:
    if c.kind == "slo":
        return f"{c.metric} observed {c.observed:,.1f} ms > limit {c.limit:,.1f} ms"
    return f"{c.metric}: {c.observed} (limit {c.limit})"


def write(path: Path, shape: Mapping[str, Any], slos: Mapping[str, float], why: str) -> Path:
    """The breaking shape as a workload file, and beside it (.json) how to rerun it."""
    load = shape_workload(shape["prompt_tokens"], shape["output_tokens"])
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": p.id, "prompt": p.prompt, "max_tokens": p.max_tokens})
             for p in load.prompts]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rerun = (
        f"tokperf.run({shape['scenario']!r}, requests={shape['requests']}, "
        f"workload={str(path)!r}, qps={shape['qps']!r}, seed={shape['seed']})"
    )
    meta = {"shape": dict(shape), "slos_ms": dict(slos), "why": why, "rerun": rerun}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path
