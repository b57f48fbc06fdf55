"""`tokperf`, the object a test drives: workload -> driver -> metrics, one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from pytest_tokperf import driver, metrics, verdict, workloads
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import Engine, Request
from pytest_tokperf.profiles import Profile

Progress = Callable[[Sequence[RequestRecord], float], None]
SERVER = ("server", "interactive")


def _check_int(name: str, value: object, least: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"tokperf.run({name}={value!r}): expected an integer")
    if value < least:
        raise ValueError(f"tokperf.run({name}={value}): must be at least {least}")


def _check_seconds(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"tokperf.run({name}={value!r}): expected a positive number of seconds")


class Tokperf:
    """Runs measured workloads on the session's engine; remembers the last result.

    The plugin sets `floors` and `confidence` (for sequential early stopping) and
    `progress` (the live line) before the test body runs.
    """

    def __init__(self, engine: Engine, profile: Profile) -> None:
        self.engine = engine
        self.profile = profile
        self.results: list[metrics.RunResult] = []
        self.looks: list[int] = []  # per result: sequential looks its verdict is split over
        self.floors: Mapping[str, float] = {}
        self.confidence = 0.95
        self.progress: Progress | None = None

    @property
    def last(self) -> metrics.RunResult | None:
        return self.results[-1] if self.results else None

    def run(
        self,
        scenario: str = "offline",
        requests: int | None = None,
        max_tokens: int | None = None,
        workload: str | Path | None = None,
        *,
        qps: float | None = None,
        concurrency: int | None = None,
        duration_s: float | None = None,
        max_duration_s: float | None = None,
        min_duration_s: float = 0.0,
        min_requests: int = 0,
        seed: int = 0,
        warmup: int | None = None,
        timeout_s: float | None = None,
    ) -> metrics.RunResult:
        """Measure a run of `scenario` cycling through `workload`.

        `offline` issues `requests` (default: the profile's) at once. `server` and
        `interactive` issue at seeded Poisson arrivals at `qps`; `concurrency` keeps
        `concurrency` requests in flight. Those run until `requests` are issued or,
        given `duration_s`, for that long; given `max_duration_s` instead they stop
        as soon as the throughput floors' verdict is decisive (after at least
        `min_duration_s` and `min_requests` completed requests). `max_tokens`
        overrides each prompt's own; `warmup` requests run first, unmeasured.
        Requests not done after `timeout_s` (default 600 s, or twice the duration
        plus a minute) are recorded as failed.
        """
        if scenario not in driver.SCENARIOS:
            raise ValueError(
                f"tokperf.run(scenario={scenario!r}): available: {', '.join(driver.SCENARIOS)}"
            )
        for name, value, least in (
            ("requests", requests, 1),
            ("max_tokens", max_tokens, 1),
            ("warmup", warmup, 0),
            ("concurrency", concurrency, 1),
            ("min_requests", min_requests, 0),
            ("seed", seed, 0),
        ):
            _check_int(name, value, least)
        for name, seconds in (
            ("qps", qps),
            ("duration_s", duration_s),
            ("max_duration_s", max_duration_s),
            ("timeout_s", timeout_s),
        ):
            _check_seconds(name, seconds)
        if min_duration_s < 0:
            raise ValueError(f"tokperf.run(min_duration_s={min_duration_s}): must be 0 or more")
        if scenario in SERVER and qps is None:
            raise ValueError(f"tokperf.run(scenario={scenario!r}) needs qps=<requests per second>")
        if scenario not in SERVER and qps is not None:
            raise ValueError(
                f"tokperf.run(qps=...) applies to server and interactive, not {scenario}"
            )
        if scenario == "concurrency" and concurrency is None:
            raise ValueError(
                "tokperf.run(scenario='concurrency') needs concurrency=<requests in flight>"
            )
        if scenario != "concurrency" and concurrency is not None:
            raise ValueError(f"tokperf.run(concurrency=...) applies to concurrency, not {scenario}")
        if duration_s is not None and max_duration_s is not None:
            raise ValueError(
                "tokperf.run: give duration_s (fixed) or max_duration_s (may stop early), not both"
            )
        bound = duration_s or max_duration_s
        if scenario == "offline" and bound is not None:
            raise ValueError(
                "tokperf.run(scenario='offline') issues a fixed number of requests; "
                "duration bounds apply to server, interactive and concurrency"
            )
        if timeout_s is None:
            timeout_s = 600.0 if bound is None else max(600.0, 2 * bound + 60)
        elif bound is not None and timeout_s <= bound:
            raise ValueError(f"tokperf.run(timeout_s={timeout_s}) must exceed the duration {bound}")

        load = workloads.load(workload)
        default = self.profile.max_tokens
        measured: Iterable[Request]
        if requests is None and bound is not None:
            measured = load.endless(max_tokens, default)
        else:
            measured = load.requests(requests or self.profile.requests, max_tokens, default)
        n_warmup = self.profile.warmup if warmup is None else warmup
        warm = load.requests(n_warmup, max_tokens, default) if n_warmup else []
        plan = driver.Plan(
            scenario=scenario,
            qps=qps,
            concurrency=concurrency,
            seed=seed,
            min_requests=min_requests,
            min_duration_s=min_duration_s,
            max_duration_s=bound,
            timeout_s=timeout_s,
            look_every_s=min(driver.LOOK_EVERY_S, (bound or 60.0) / 64),
        )
        stop = None
        if max_duration_s is not None and self.floors:
            stop = verdict.Sequential(
                max_duration_s, self.floors, self.engine.info.devices, self.confidence
            )
        driven = driver.run_plan(
            self.engine, measured, plan, warmup=warm, stop=stop, progress=self.progress
        )
        result = metrics.summarize(
            driven.records,
            self.engine.info,
            scenario=scenario,
            workload=load.name,
            max_tokens=max_tokens,
            qps=qps,
            concurrency=concurrency,
            client_cpu=driven.client_cpu,
            stopped=driven.stopped,
            window_end_ns=driven.window_end_ns,
        )
        self.results.append(result)
        self.looks.append(1 if stop is None else stop.looks)
        return result
