"""The pytest11 entry point: options, markers and the user-facing fixtures, no state.

The state lives in three objects registered as plugins at configure time: the harness
("tokperf-harness": settings, GPUs, engines, servers), the gate ("tokperf-gate":
markers and results into pass/fail/skip) and the results ("tokperf-results": every
output). Precedence of every setting, written down once: marker > command line >
environment > ini > profile default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TypeVar

import pytest

from pytest_tokperf import cache, driver, hardware, markers, reference, settings
from pytest_tokperf.engines import Engine, Request
from pytest_tokperf.gate import RUNNER, Gate
from pytest_tokperf.harness import Harness
from pytest_tokperf.results import Results
from pytest_tokperf.runner import Tokperf

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    settings.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for line in markers.HELP:
        config.addinivalue_line("markers", line)
    if config.getoption("help"):  # --help resolves no setting: a bad one must not break it
        return
    for warning in settings.unknown_environment(os.environ):
        config.issue_config_time_warning(pytest.PytestConfigWarning(warning), stacklevel=2)
    harness = Harness(config)  # resolves the settings; under MPI registers "tokperf-rack"
    s, world, inventory = harness.settings, harness.world, harness.inventory
    config.pluginmanager.register(Gate(config, s, world, inventory), "tokperf-gate")
    # after the gate: its report hook then sees the outcome the gate decided
    config.pluginmanager.register(harness, "tokperf-harness")
    results = Results(config, s, inventory, world, harness.records)
    config.pluginmanager.register(results, "tokperf-results")


def _plugin(config: pytest.Config, name: str, kind: type[T]) -> T:
    plugin = config.pluginmanager.get_plugin(name)
    assert isinstance(plugin, kind)
    return plugin


def _harness(config: pytest.Config) -> Harness:
    return _plugin(config, "tokperf-harness", Harness)


def _gate(config: pytest.Config) -> Gate:
    return _plugin(config, "tokperf-gate", Gate)


@pytest.fixture(scope="session")
def tokperf_gpus(pytestconfig: pytest.Config) -> Iterator[hardware.Allocation]:
    """This process's GPUs, locked for the session; CUDA_VISIBLE_DEVICES names them.

    Each xdist worker gets a disjoint set. Without enough suitable free GPUs the
    tests that need them skip (or fail with --tokperf-require-hardware).
    """
    allocation = _harness(pytestconfig).allocate()
    try:
        # by UUID: NVML's order may differ from CUDA's; set before any engine loads
        with hardware.cuda_visible(allocation):
            yield allocation
    finally:
        allocation.release()


@pytest.fixture(scope="session")
def tokperf_engine(
    pytestconfig: pytest.Config, tokperf_gpus: hardware.Allocation
) -> Iterator[Engine]:
    """The profile's engine on this process's allocation (once per xdist worker)."""
    harness = _harness(pytestconfig)
    engine = harness.open_engine(tokperf_gpus)
    yield engine
    harness.loop.run_until_complete(engine.aclose())


@pytest.fixture(scope="session")
def tokperf_reference_engine(pytestconfig: pytest.Config) -> Engine:
    """The same backend and model at the profile's reference precision, loaded lazily
    (once per process; closed at the end of the session)."""
    harness = _harness(pytestconfig)
    profile = harness.settings.profile
    at = profile.reference_precision
    if at is None:
        pytest.fail(f"tokperf profile {profile.name!r} names no reference_precision", False)
    return harness.reference_engine(at)


@pytest.fixture
def tokperf(
    request: pytest.FixtureRequest, tokperf_engine: Engine, tokperf_gpus: hardware.Allocation
) -> Tokperf:
    """Runs measured workloads: `tokperf.run(scenario="offline", requests=N, max_tokens=M)`
    (also server/interactive with qps=, concurrency with concurrency=), and accuracy
    parity: `tokperf.accuracy(dataset=..., samples=N)`."""
    harness, gate = _harness(request.config), _gate(request.config)
    s = harness.settings
    runner = Tokperf(
        tokperf_engine,
        s.profile,
        harness.loop,
        reference=harness.reference_engine,
        telemetry=lambda: hardware.Sampler(
            harness.nvml, tokperf_gpus.uuids, root=harness.tree_root
        ),
        gpus=tokperf_gpus.uuids,
        client_procs=s.client_procs,
        spawn=harness.spawn,
    )
    runner.parity_spec = gate.parity(request.node) or reference.defaults(s.profile)
    runner.confidence = s.confidence
    runner.saving = s.save_baseline is not None
    runner.dataset = s.dataset
    if s.dataset_missing is not None:
        runner.dataset_missing = lambda: gate.no_dataset(request.node)
    floors = gate.floors(request.node)
    runner.floors = floors or {}
    runner.judged = floors is not None
    runner.capacity_floor = gate.capacity(request.node)
    runner.busy, runner.throttled = s.busy_machine, s.profile.throttled
    gate.early_stopping(request.node, runner, tokperf_gpus.uuids)
    runner.progress = _plugin(request.config, "tokperf-results", Results).progress()
    runner.before_run = harness.world.start
    if harness.records is not None:
        write = harness.records.write
        runner.after_run = lambda result, anchor: write(
            result.records, anchor, request.node.nodeid, len(runner.results) - 1,
            result.window_end_ns,
        )  # fmt: skip
    request.node.stash[RUNNER] = runner
    return runner


@pytest.fixture
def tokperf_cache(request: pytest.FixtureRequest, tokperf_engine: Engine) -> cache.Cache:
    """The engine's prefix cache: `flush()`, `prime(workload)`, `hit_rate()` since then."""
    harness = _harness(request.config)

    def prime(prompts: Sequence[str]) -> None:
        primer = [Request(f"prime-{i}", p, 1, detokenize=False) for i, p in enumerate(prompts)]
        failed = [r for r in driver.run(tokperf_engine, primer, loop=harness.loop) if r.error]
        if failed:
            raise cache.CacheError(f"priming failed: {failed[0].id}: {failed[0].error}")

    return cache.Cache(tokperf_engine, prime)


@pytest.fixture(autouse=True)
def _tokperf_parity(request: pytest.FixtureRequest) -> None:
    """Tests marked accuracy_parity get the runner even when they do not ask for it, and
    their reference engine: a missing reference errors before anything runs."""
    spec = _gate(request.config).parity(request.node)
    if spec is not None:
        request.getfixturevalue("tokperf")
        harness = _harness(request.config)
        at = spec.reference or harness.settings.profile.reference_precision
        if at is not None:
            harness.reference_engine(at)


@pytest.fixture(autouse=True)
def _tokperf_floor(request: pytest.FixtureRequest) -> None:
    """For tests marked throughput_floor or latency_slo: skip without a bound for this
    profile, else load the engine."""
    floors = _gate(request.config).floors(request.node)
    if floors is not None:
        runner = request.getfixturevalue("tokperf")
        runner.floors, runner.judged = floors, True
