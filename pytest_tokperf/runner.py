"""`tokperf`, the object a test drives: workload -> driver -> metrics, one call."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_tokperf import (
    accuracy,
    cache,
    capacity,
    driver,
    markers,
    metrics,
    procs,
    records,
    sequential,
    server_metrics,
    verdict,
    workloads,
    worst,
)
from pytest_tokperf import hardware as gpus_module
from pytest_tokperf import sweep as sweep_module
from pytest_tokperf import trace as trace_module
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import Engine, LogitsEngine, PreparingEngine, Request
from pytest_tokperf.profiles import Profile

Progress = Callable[[Sequence[RequestRecord], float], None]
SERVER = ("server", "interactive")


# a capacity probe's arrivals last this much longer than its minimum, so the run (first
# issue to last completion) is never a hair short of it
DURATION_MARGIN = 1.05
BUDGET_S = 120.0  # a capacity search's default budget
MOST_REQUESTS = 10_000_000  # per run; each is an object in memory before it is issued
# requests in flight per run: each is a task and a connection (a hypothesis example of
# concurrency=10**400 made the closed loop start tasks until the machine ran out of memory)
MOST_CONCURRENCY = 100_000


def _check_int(name: str, value: object, least: int, most: int | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"tokperf.run({name}={value!r}): expected an integer")
    if value < least:
        raise ValueError(f"tokperf.run({name}={value}): must be at least {least}")
    if most is not None and value > most:
        raise ValueError(f"tokperf.run({name}={value}): must be at most {most:,}")


def _check_seconds(
    name: str, value: object, *, zero: bool = False, call: str = "tokperf.run"
) -> None:
    """None, or a finite number of seconds: positive (or also 0, with `zero`)."""
    if value is None:
        return
    number = verdict.finite(value)
    if number is None or number < 0 or (number == 0 and not zero):
        kind = "0 or a positive" if zero else "a positive"
        raise ValueError(f"{call}({name}={value!r}): expected {kind} number of seconds")


class Tokperf:
    """Runs measured workloads on the session's engine; remembers the last result.

    The plugin sets `floors` and `confidence` (for sequential early stopping) and
    `progress` (the live line) before the test body runs.
    """

    def __init__(
        self,
        engine: Engine,
        profile: Profile,
        loop: asyncio.AbstractEventLoop | None = None,
        reference: Callable[[str], Engine] | None = None,
        *,
        telemetry: Callable[[], gpus_module.Sampler] | None = None,
        gpus: Sequence[str] = (),
        client_procs: int = 1,
        spawn: procs.Spawn | None = None,
    ) -> None:
        self.engine = engine
        self.client_procs = client_procs  # 0: auto
        self.spawn = spawn  # how a client process loads this engine again
        self.profile = profile
        self.loop = loop
        self.judged = False  # the test has floors or SLOs (the plugin says): runs fill its minimum
        self.saving = False  # its results are saved as a baseline: no early stop
        # what early stopping decides besides the floors: the SLOs for a scenario, and the
        # stored baseline of a run (the plugin gives both from the test's markers)
        self.slos: Callable[[str], Mapping[str, float]] = lambda scenario: {}
        self.baseline: Callable[[Mapping[str, Any]], sequential.Baseline | None] = lambda run: None
        # a fresh sampler per measured run: telemetry of the run, not of the warm-up
        self.telemetry = telemetry or (lambda: gpus_module.Sampler(None, ()))
        self.gpus = tuple(gpus)  # UUIDs of the GPUs the engine was given
        self.results: list[metrics.RunResult] = []
        self.looks: list[int] = []  # per result: sequential looks its verdict is split over
        self.floors: Mapping[str, float] = {}
        self.confidence = 0.95
        # the least a judged run lasts: --tokperf-min-duration, else the profile's
        self.min_duration_s = profile.min_duration_s
        self.progress: Progress | None = None
        # the rack's start meeting (MPI): called right before each measured run
        self.before_run: Callable[[], None] = lambda: None
        self.anchors: list[records.Anchor] = []  # per result: its wall-clock anchor
        self.after_run: Callable[[metrics.RunResult, records.Anchor], None] | None = None
        # accuracy parity: the reference engine by precision (loaded lazily by the plugin)
        self.reference = reference
        self.parity_spec = accuracy.ParitySpec()  # the test's marker, when it has one
        self.parity_results: list[accuracy.ParityResult] = []
        # the workload of a run that names none (None: the built-in set), and what
        # happens when the profile's floors need a dataset that is not there
        self.dataset: str | Path | None = None
        self.dataset_missing: Callable[[], None] | None = None
        # capacity searches (`capacity`), and the test's capacity_floor marker: its min_qps
        # and SLOs under this profile (the plugin sets it)
        self.capacities: list[capacity.Capacity] = []
        self.capacity_floor: Mapping[str, float] | None = None
        self.probing = False  # a capacity probe runs: its run is kept by the search
        # how a probe's surroundings count (--tokperf-busy-machine, the profile's throttled)
        self.busy, self.throttled = "invalid", "note"
        self.sweeps: list[sweep_module.Sweep] = []  # `sweep`: one run per load point

    @property
    def last_parity(self) -> accuracy.ParityResult | None:
        return self.parity_results[-1] if self.parity_results else None

    def accuracy(
        self,
        dataset: str | Path | None = None,
        samples: int | None = None,
        max_tokens: int | None = None,
        *,
        reference: str | None = None,
        rouge_ratio: float | None = None,
        tokens_per_sample: tuple[float, float] | None = None,
        max_kl: float | None = None,
        min_top1: float | None = None,
        timeout_s: float = 600.0,
    ) -> accuracy.ParityResult:
        """Accuracy parity of this engine against the reference precision.

        The first `samples` prompts of `dataset` (default: the marker's, else the
        built-in set; `samples` default: the profile's requests) run greedily on both
        engines. Arguments left out come from the test's `accuracy_parity` marker.
        """
        for name, value in (("samples", samples), ("max_tokens", max_tokens)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"tokperf.accuracy({name}={value!r}): expected a positive integer")
        _check_seconds("timeout_s", timeout_s, call="tokperf.accuracy")
        given = {"reference": reference, "rouge_ratio": rouge_ratio, "max_kl": max_kl,
                 "tokens_per_sample": tokens_per_sample, "min_top1": min_top1,
                 "dataset": dataset}  # fmt: skip
        try:  # the marker's rules, for the same arguments given here
            markers.parse_parity_marker(
                (), {k: v for k, v in given.items() if v is not None}, "tokperf.accuracy()", None
            )
        except pytest.UsageError as exc:
            raise ValueError(str(exc)) from None
        spec = self.parity_spec
        spec = accuracy.ParitySpec(
            reference=reference or spec.reference,
            rouge_ratio=spec.rouge_ratio if rouge_ratio is None else rouge_ratio,
            tokens_per_sample=tokens_per_sample or spec.tokens_per_sample,
            max_kl=spec.max_kl if max_kl is None else max_kl,
            min_top1=spec.min_top1 if min_top1 is None else min_top1,
            dataset=spec.dataset if dataset is None else str(dataset),
        )
        precision = spec.reference or self.profile.reference_precision
        if precision is None:
            raise ValueError(
                f"tokperf.accuracy(): profile {self.profile.name!r} names no reference_precision; "
                "pass reference=... or mark the test accuracy_parity(reference=...)"
            )
        if self.reference is None:
            raise ValueError("tokperf.accuracy(): this runner has no reference engine")
        load = workloads.load(spec.dataset)
        count = samples or self.profile.requests
        if count > len(load.prompts):
            asked = "" if samples else " (the profile's requests)"
            raise ValueError(
                f"tokperf.accuracy(samples={count}){asked}: the workload {load.name} has "
                f"{len(load.prompts)} prompts; ask for at most that many, or give a dataset "
                "with more"
            )
        result = run_parity(
            self.engine,
            self.reference(precision),
            load,
            samples=count,
            max_tokens=max_tokens,
            default_max_tokens=self.profile.max_tokens,
            spec=spec,
            reference_precision=precision,
            timeout_s=timeout_s,
            loop=self.loop,
        )
        self.parity_results.append(result)
        return result

    @property
    def last(self) -> metrics.RunResult | None:
        return self.results[-1] if self.results else None

    def run(
        self,
        scenario: str = "offline",
        requests: int | None = None,
        max_tokens: int | None = None,
        workload: str | Path | workloads.Workload | None = None,
        *,
        qps: float | None = None,
        concurrency: int | None = None,
        duration_s: float | None = None,
        max_duration_s: float | None = None,
        min_duration_s: float | None = None,
        min_requests: int = 0,
        seed: int = 0,
        warmup: int | None = None,
        timeout_s: float | None = None,
        allow_failures: int = 0,
        trace_speed: float = 1.0,
        trace_window: tuple[float, float] | None = None,
        cache_hit_rate: tuple[float, float] | None = None,
    ) -> metrics.RunResult:
        """Measure a run of `scenario` cycling through `workload`.

        `offline` issues `requests` (default: the profile's) at once. `server` and
        `interactive` issue at seeded Poisson arrivals at `qps`; `concurrency` keeps
        `concurrency` requests in flight. Those run until `requests` are issued or,
        given `duration_s`, for that long; given `max_duration_s` instead they stop
        as soon as every check's verdict is decisive (after at least `min_duration_s`
        seconds, default the profile's or --tokperf-min-duration, and `min_requests`
        completed requests); a test with floors or SLOs cannot PASS on a run shorter
        than that minimum. `max_tokens`
        overrides each prompt's own; `warmup` requests run first, unmeasured.
        `trace` replays the Mooncake (.jsonl) or BurstGPT (.csv) trace `workload`: each
        request at its trace time divided by `trace_speed`, only those inside
        `trace_window` (start_s, end_s of trace time), with the traced lengths (trace.py).
        Requests not done after `timeout_s` (default 600 s, or twice the duration
        plus a minute) are recorded as failed. `cache_hit_rate=(low, high)`: the run's
        prefix-cache hit rate must lie in that band, else the run is INVALID (cache.py).
        A run with a failed request fails the test, unless the test allows that many
        (`allow_failures`).
        """
        if scenario not in driver.SCENARIOS:
            raise ValueError(
                f"tokperf.run(scenario={scenario!r}): available: {', '.join(driver.SCENARIOS)}"
            )
        for name, value, least, most in (
            ("requests", requests, 1, MOST_REQUESTS),
            ("max_tokens", max_tokens, 1, None),
            ("warmup", warmup, 0, MOST_REQUESTS),
            ("concurrency", concurrency, 1, MOST_CONCURRENCY),
            ("min_requests", min_requests, 0, None),
            ("seed", seed, 0, None),
            ("allow_failures", allow_failures, 0, None),
        ):
            _check_int(name, value, least, most)
        for name, seconds in (
            ("qps", qps),
            ("duration_s", duration_s),
            ("max_duration_s", max_duration_s),
            ("timeout_s", timeout_s),
        ):
            _check_seconds(name, seconds)
        _check_seconds("min_duration_s", min_duration_s, zero=True)
        if workload is not None and not isinstance(
            workload, (str, os.PathLike, workloads.Workload)
        ):
            raise ValueError(
                f"tokperf.run(workload={workload!r}): expected a built-in set's name, a "
                "JSONL file's path or a workloads.Workload"
            )
        band = cache.check_band(cache_hit_rate)
        if scenario in SERVER and qps is None:
            raise ValueError(f"tokperf.run(scenario={scenario!r}) needs qps=<requests per second>")
        replay = None
        if scenario == "trace":
            replay = trace_module.checked(
                workload, trace_speed, trace_window, requests=requests, max_tokens=max_tokens,
                bounds=(duration_s, max_duration_s),
            )  # fmt: skip
        elif trace_speed != 1.0 or trace_window is not None:
            raise ValueError(
                f"tokperf.run(trace_speed=, trace_window=) apply to trace, not {scenario}"
            )
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
        if min_duration_s is None:
            min_duration_s = self.min_duration_s
        # a judged Offline run of the profile's size lasts at least the minimum: its
        # query refilled as answers come back, as LoadGen sizes its Offline query to
        # fill min_duration (one process: client processes split a fixed count)
        fill = (
            scenario == "offline" and requests is None and self.judged and min_duration_s > 0
            and self.client_procs == 1
        )  # fmt: skip
        if timeout_s is None:
            longest = bound if bound is not None else (min_duration_s if fill else None)
            if replay is not None:  # the trace's span, and its last requests' time to finish
                longest = replay.entries[-1].at_s
            timeout_s = 600.0 if longest is None else max(600.0, 2 * longest + 60)
        elif bound is not None and timeout_s <= bound:
            raise ValueError(f"tokperf.run(timeout_s={timeout_s}) must exceed the duration {bound}")

        if workload is None and self.dataset_missing is not None:
            self.dataset_missing()  # skips or fails: the profile's floors need its dataset
        load = workloads.load(
            None if replay else workload if workload is not None else self.dataset
        )  # a trace's warm-up requests are the built-in prompts: none of its prefixes
        default = self.profile.max_tokens
        measured: Iterable[Request]
        offsets = None
        # a throughput run needs token counts, not text (accuracy runs keep text)
        if replay is not None:
            count = len(replay.entries)
            measured = trace_module.requests(replay, trace_module.engine_words(self.engine))
            offsets = replay.offsets_ns()
        elif requests is None and bound is not None:
            measured = load.endless(max_tokens, default, detokenize=False)
        else:
            count = requests or self.profile.requests
            measured = load.requests(count, max_tokens, default, detokenize=False)
        if fill:
            measured = filled(load.endless(max_tokens, default, detokenize=False), count,
                              min_duration_s)  # fmt: skip
        n_warmup = self.profile.warmup if warmup is None else warmup
        warm = load.requests(n_warmup, max_tokens, default, detokenize=False) if n_warmup else []
        if isinstance(self.engine, PreparingEngine):  # tokenize before, not during, the run
            self.engine.prepare([p.prompt for p in load.prompts] if replay is None
                                else [r.prompt for r in measured])  # fmt: skip
        plan = driver.Plan(
            scenario="concurrency" if fill else scenario,  # a full queue, refilled
            qps=qps,
            concurrency=count if fill else concurrency,
            seed=seed,
            min_requests=min_requests,
            min_duration_s=min_duration_s,
            max_duration_s=bound,
            timeout_s=timeout_s,
            look_every_s=min(driver.LOOK_EVERY_S, (bound or 60.0) / 64),
            texts=False,  # a perf run keeps timestamps and counts, not the answers
            offsets_ns=offsets,
        )
        stop = None
        slos = self.slos(scenario)
        info = self.engine.info
        base = self.baseline(
            {"scenario": scenario, "workload": load.name, "max_tokens": max_tokens, "qps": qps,
             "concurrency": concurrency, "engine": {"model": info.model,
                                                     "precision": info.precision}}
            | ({"trace_speed": trace_speed, "trace_window": trace_window} if replay else {})
        )  # fmt: skip
        # a run saved as a baseline is the yardstick of later comparisons: its whole length
        if max_duration_s is not None and (self.floors or slos or base) and not self.saving:
            stop = sequential.Sequential(
                max_duration_s,
                self.floors,
                info.devices,
                self.confidence,
                slos=slos,
                min_duration_s=min_duration_s,
                baseline=base,
                scenario=scenario,
            )
        if warm:  # apart from the measured run, so telemetry covers that run alone
            driver.run(self.engine, warm, timeout_s=timeout_s, loop=self.loop)
        self.before_run()
        counters = cache.Counters(self.engine)  # after the warm-up: this run's hits alone
        anchor = records.anchor()
        interrupted: driver.Interrupted | None = None
        watch = server_metrics.Watch(server_metrics.url_for(info.settings, info.backend))
        n = self.client_procs
        if n == 0:  # auto: from the offered load (a server run) or the floors
            offered = (
                (qps * (max_tokens or default)) if qps else max(self.floors.values(), default=0)
            )
            if "per_gpu" in self.floors:
                offered = max(offered, self.floors["per_gpu"] * info.devices)
            n = procs.auto_count(offered)
        if self.spawn is None or (
            self.client_procs == 0 and self.spawn.backend not in procs.SPAWNABLE
        ):
            n = 1  # auto never splits an engine a child process cannot load again
        if replay is not None:
            n = 1  # one process issues the whole trace at its times
        if concurrency is not None:
            n = min(n, concurrency)  # each process keeps a stream: never more than asked
        with self.telemetry() as sampler, watch:
            if n > 1 and self.spawn is not None:
                endless = requests is None and bound is not None
                count = len(load.prompts)  # a concurrency share cycles in its process
                if endless and scenario in SERVER:  # every arrival of the schedule's window
                    assert qps is not None and bound is not None
                    window = itertools.takewhile(
                        lambda at: at < bound * driver.NS, driver.poisson_offsets_ns(qps, seed)
                    )
                    count = sum(1 for _ in window)
                share = list(itertools.islice(measured, count)) if endless else list(measured)
                endless = endless and scenario not in SERVER
                driven = procs.run(
                    self.spawn, share, plan, n, endless=endless, stop=stop, progress=self.progress
                )
            else:
                try:
                    driven = driver.run_plan(
                        self.engine,
                        measured,
                        plan,
                        stop=stop,
                        progress=self.progress,
                        loop=self.loop,
                    )
                except driver.Interrupted as exc:  # Ctrl-C: keep what finished, then stop
                    driven, interrupted = exc.driven, exc
        result = metrics.summarize(
            driven.records,
            self.engine.info,
            scenario=scenario,
            workload=load.name if replay is None else replay.name,
            max_tokens=max_tokens,
            qps=qps,
            concurrency=concurrency,
            client_cpu=driven.client_cpu,
            stopped=driven.stopped,
            window_end_ns=driven.window_end_ns,
        )
        result = metrics.with_telemetry(result, sampler.summary())
        result = dataclasses.replace(
            result,
            allowed_failures=allow_failures,
            min_duration_s=min_duration_s,
            token_counting=dict(driven.token_counting),
            client_procs=driven.procs,
            server=watch.summary(sum(r.output_tokens for r in driven.records), scenario),
            cache=counters.summary(watch.samples, band),
        )
        if not self.probing:  # a capacity probe belongs to its Capacity, not to the runs
            self.results.append(result)
            self.looks.append(1 if stop is None else stop.looks)
            self.anchors.append(anchor)
            if self.after_run is not None:
                self.after_run(result, anchor)
        if interrupted is not None:
            raise interrupted
        return result

    def sweep(self, scenario: str | None = None, **kwargs: Any) -> sweep_module.Sweep:
        """One run per load point: `qps=[...]` (server, interactive) or `concurrency=[...]`;
        the other keywords as `run`'s (requests, max_tokens, workload, duration_s, seed,
        warmup). The report draws the throughput-vs-latency curve and the Pareto plot."""
        return sweep_module.sweep(self, scenario, **kwargs)

    def search_worst(self, slo: Mapping[str, float], **kwargs: Any) -> worst.Worst:
        """The smallest workload shape (prompt_tokens=, output_tokens=, qps=: values or
        hypothesis strategies) whose short Server run breaks `slo`, shrunk by hypothesis
        within `budget_s` and written as a workload file (`worst` module)."""
        return worst.search_worst(self, slo, **kwargs)

    def capacity(
        self,
        scenario: str | None = None,
        max_tokens: int | None = None,
        workload: str | Path | None = None,
        *,
        slos: Mapping[str, float] | None = None,
        min_qps: float | None = None,
        min_concurrency: int | None = None,
        budget_s: float | None = None,
        probe_s: float | None = None,
        tolerance: float = 0.05,
        seed: int = 0,
        saturation_requests: int | None = None,
    ) -> capacity.Capacity:
        """The highest request rate that meets every SLO (`capacity` module: an Offline
        estimate of the saturation rate, then bisection on the rate); with
        `scenario="concurrency"` (the default when the floor is `min_concurrency`) the
        highest number of requests in flight, closed loop, doubling then bisecting.

        `slos` (e.g. {"ttft_p99_ms": 2000}) and `min_qps` (or `min_concurrency`) default
        to the test's capacity_floor marker; the marker's floor and the one given are
        always probed. Each probe lasts `probe_s` (default: min_duration_s, at least
        1 s), longer when its load needs it to reach LoadGen's early-stopping minimum of
        samples; later probes are made while they fit in `budget_s` (default: the
        marker's, else 120 s).
        """
        call = "tokperf.capacity"
        marker = dict(self.capacity_floor or {})
        closed = "min_concurrency" in marker or min_concurrency is not None
        scenario = scenario or ("concurrency" if closed else "server")
        if scenario not in (*SERVER, "concurrency"):
            raise ValueError(f"{call}(scenario={scenario!r}): a capacity is searched in server, "
                             "interactive or concurrency")  # fmt: skip
        if (scenario == "concurrency") != closed or (closed and min_qps is not None):
            raise ValueError(
                f"{call}(scenario={scenario!r}): min_qps goes with server or interactive, "
                "min_concurrency (in the call or the capacity_floor marker) with concurrency"
            )
        floor = marker.pop("min_concurrency" if closed else "min_qps", None)
        budget_s = budget_s or marker.pop("budget_s", BUDGET_S)
        marker.pop("budget_s", None)
        given = dict(slos or {})
        try:  # the marker's rules for the same values given here
            markers.parse_slo_marker((), given, f"{call}(slos=...)", ())
            for key, value in (("min_qps", min_qps), ("min_concurrency", min_concurrency)):
                if value is not None:
                    given_floor = {key: value, "ttft_p99_ms": 1}
                    markers.parse_capacity_marker((), given_floor, f"{call}()", ())
        except pytest.UsageError as exc:
            raise ValueError(str(exc)) from None
        limits = given or marker
        if not limits:
            raise ValueError(f"{call}() needs SLOs: slos={{'ttft_p99_ms': ...}} or a "
                             "capacity_floor marker with them")  # fmt: skip
        for name, seconds in (("budget_s", budget_s), ("probe_s", probe_s)):
            _check_seconds(name, seconds, call=call)
        if verdict.finite(tolerance) is None or not 0 < tolerance < 1:
            raise ValueError(f"{call}(tolerance={tolerance!r}): expected a fraction in (0, 1)")
        _check_int("seed", seed, 0)
        _check_int("saturation_requests", saturation_requests, 1, MOST_REQUESTS)
        floors = tuple(f for f in (floor, min_qps, min_concurrency) if f is not None)
        self.probing = True  # the search keeps its probes' runs, not the test's runs
        try:
            found = capacity.find(
                self.run, scenario, limits, floors,
                max_tokens=max_tokens, workload=workload, seed=seed, tolerance=tolerance,
                budget_s=budget_s, least_s=max(self.min_duration_s, probe_s or 1.0),
                saturation_requests=saturation_requests or self.profile.requests,
                margin=DURATION_MARGIN,
                judge=functools.partial(capacity.judge_probe, busy=self.busy,
                                        throttled=self.throttled, confidence=self.confidence),
            )  # fmt: skip
        finally:
            self.probing = False
        self.capacities.append(found)
        return found


def filled(source: Iterator[Request], count: int, seconds: float) -> Iterator[Request]:
    """`count` requests, then more while the run is younger than `seconds` (from the first
    request taken): an Offline query that lasts the minimum, its queue as full as at the
    start until then."""
    start = None
    for i, request in enumerate(source):
        now = time.perf_counter()
        start = now if start is None else start
        if i >= count and now - start >= seconds:
            return
        yield request


def run_parity(
    test: Engine,
    reference: Engine,
    load: workloads.Workload,
    *,
    samples: int,
    max_tokens: int | None,
    default_max_tokens: int,
    spec: accuracy.ParitySpec,
    reference_precision: str,
    timeout_s: float = 600.0,
    loop: asyncio.AbstractEventLoop | None = None,
) -> accuracy.ParityResult:
    """Both engines answer the same prompts; score the test engine against the reference."""
    logits_ok = isinstance(test, LogitsEngine) and isinstance(reference, LogitsEngine)
    if (spec.max_kl is not None or spec.min_top1 is not None) and not logits_ok:
        lacking = test if not isinstance(test, LogitsEngine) else reference
        raise accuracy.ParityError(
            f"max_kl / min_top1 need next-token logits, which the {lacking.info.backend} "
            "engine does not expose; drop them or use an engine that does"
        )
    if reference is test or _engine(reference) == _engine(test):
        raise accuracy.ParityError(
            f"the reference engine is the engine under test ({test.info.backend} "
            f"{test.info.model} {test.info.precision}): parity would compare it with itself; "
            "give a reference of another precision"
        )
    prompts = load.prompts[:samples]
    requests = load.requests(len(prompts), max_tokens, default_max_tokens)
    ref_records = driver.run(reference, requests, timeout_s=timeout_s, loop=loop)
    test_records = driver.run(test, requests, timeout_s=timeout_s, loop=loop)
    errors = [f"{r.id}: {r.error}" for r in (*ref_records, *test_records) if r.error]
    if errors:
        raise accuracy.ParityError(f"{len(errors)} accuracy requests failed; first: {errors[0]}")
    with_refs = all(p.reference for p in prompts)
    mode = "dataset" if with_refs else "agreement"
    ref_texts = [r.text for r in ref_records]
    test_texts = [r.text for r in test_records]
    if with_refs:
        targets = [p.reference or "" for p in prompts]
        test_rouge = accuracy.rouge(test_texts, targets)
        ref_rouge = accuracy.rouge(ref_texts, targets)
    else:
        targets = ref_texts
        test_rouge = accuracy.rouge(test_texts, targets)
        # the reference's outputs scored against themselves: 100, except where a score is
        # undefined (ROUGE-2 of a one-word answer is 0), so identical answers agree exactly
        ref_rouge = accuracy.rouge(ref_texts, targets)
    out: list[accuracy.Sample] = []
    for i, prompt in enumerate(prompts):
        ref, got = ref_records[i], test_records[i]
        kl_sum = agree = positions = None
        if logits_ok and ref.token_ids:
            assert isinstance(test, LogitsEngine) and isinstance(reference, LogitsEngine)
            kl_sum, agree, positions = accuracy.token_parity(
                reference.logits(prompt.prompt, ref.token_ids),
                test.logits(prompt.prompt, ref.token_ids),
            )
        out.append(
            accuracy.Sample(
                id=prompt.id,
                target=targets[i],
                reference_output=ref.text,
                output=got.text,
                reference_tokens=ref.output_tokens,
                tokens=got.output_tokens,
                first_divergence=accuracy.first_divergence(got.token_ids, ref.token_ids),
                ids_compared=_has_ids(ref) and _has_ids(got),
                test_rouge=test_rouge[i],
                reference_rouge=ref_rouge[i],
                kl_sum=kl_sum,
                top1_agree=agree,
                positions=positions,
            )
        )
    scores, checks, status = accuracy.score(out, spec)
    settings = {
        "decoding": test.info.settings.get("decoding", "greedy"),
        "max_tokens": max_tokens or default_max_tokens,
        "max_tokens_per_prompt": [r.max_tokens for r in requests],
        "chat_template": test.info.settings.get("chat_template", "engine default"),
        "seed": test.info.settings.get("seed"),
        "bootstrap": {"resamples": accuracy.RESAMPLES, "confidence": accuracy.CONFIDENCE,
                      "seed": accuracy.SEED},
        "distribution": "teacher-forced over the reference outputs" if logits_ok
        else "not supported by these engines",
    }  # fmt: skip
    return accuracy.ParityResult(
        mode=mode,
        dataset=load.name,
        reference_precision=reference_precision,
        precision=test.info.precision,
        settings=settings,
        samples=tuple(out),
        scores=scores,
        checks=checks,
        status=status,
        engine=_engine(test),
        reference_engine=_engine(reference),
    )


def _has_ids(record: RequestRecord) -> bool:
    return bool(record.token_ids) or record.output_tokens == 0


def _engine(engine: Engine) -> dict[str, Any]:
    info = engine.info
    return {
        "backend": info.backend,
        "model": info.model,
        "precision": info.precision,
        "devices": info.devices,
        "settings": dict(info.settings),
    }
