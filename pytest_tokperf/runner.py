"""`tokperf`, the object a test drives: workload -> driver -> metrics, one call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_tokperf import driver, metrics, workloads
from pytest_tokperf import gpus as gpus_module
from pytest_tokperf.engines import Engine
from pytest_tokperf.profiles import Profile


class Tokperf:
    """Runs measured workloads on the session's engine; remembers the last result."""

    def __init__(
        self,
        engine: Engine,
        profile: Profile,
        *,
        telemetry: Callable[[], gpus_module.Sampler] | None = None,
        gpus: Sequence[str] = (),
    ) -> None:
        self.engine = engine
        self.profile = profile
        # a fresh sampler per measured run: telemetry of the run, not of the warm-up
        self.telemetry = telemetry or (lambda: gpus_module.Sampler(None, ()))
        self.gpus = tuple(gpus)  # UUIDs of the GPUs the engine was given
        self.results: list[metrics.RunResult] = []

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
        warmup: int | None = None,
        timeout_s: float = 600.0,
    ) -> metrics.RunResult:
        """Measure `requests` requests (default: the profile's) cycling through `workload`.

        `workload` is a built-in set's name or a JSONL file; `max_tokens` overrides
        each prompt's own. `warmup` requests run first and are not measured. Requests
        not done after `timeout_s` are recorded as failed.
        """
        if scenario not in driver.SCENARIOS:
            raise ValueError(
                f"tokperf.run(scenario={scenario!r}): available: {', '.join(driver.SCENARIOS)}"
            )
        for name, value in (("requests", requests), ("max_tokens", max_tokens), ("warmup", warmup)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"tokperf.run({name}={value!r}): expected an integer")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"tokperf.run(max_tokens={max_tokens}): must be at least 1")
        if warmup is not None and warmup < 0:
            raise ValueError(f"tokperf.run(warmup={warmup}): must be 0 or more")
        if timeout_s <= 0:
            raise ValueError(f"tokperf.run(timeout_s={timeout_s}): must be positive")
        load = workloads.load(workload)
        count = self.profile.requests if requests is None else requests
        measured = load.requests(count, max_tokens, self.profile.max_tokens)
        n_warmup = self.profile.warmup if warmup is None else warmup
        warm = load.requests(n_warmup, max_tokens, self.profile.max_tokens) if n_warmup else []
        if warm:  # apart from the measured run, so telemetry covers that run alone
            driver.run(self.engine, warm, timeout_s=timeout_s)
        with self.telemetry() as sampler:
            records = driver.run(self.engine, measured, scenario=scenario, timeout_s=timeout_s)
        result = metrics.summarize(
            records, self.engine.info, scenario=scenario, workload=load.name, max_tokens=max_tokens
        )
        result = metrics.with_telemetry(result, sampler.summary())
        self.results.append(result)
        return result
