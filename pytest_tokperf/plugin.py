"""The pytest11 entry point: options, markers, fixtures and hooks, kept thin.

Precedence of every setting, written down once: marker > command line >
environment > ini > profile default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_tokperf import gpus, profiles, report, verdict
from pytest_tokperf.engines import BACKENDS, Engine, EngineError, load_engine
from pytest_tokperf.runner import Tokperf

BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
FLOORS = pytest.StashKey[dict[str, float]]()
RUNNER = pytest.StashKey[Tokperf]()
PROPERTY = report.PROPERTY
FLOOR_MARKER = (
    "throughput_floor(min_tokens_per_s=None, per_gpu=None): fail the test unless its last "
    "tokperf run reaches these output tokens/s floors; each a number or a dict keyed by "
    "profile name (a profile missing from the dict skips the test)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokperf", "LLM inference performance acceptance tests")
    group.addoption(
        "--tokperf-profile",
        metavar="NAME",
        help=f"hardware profile (env {profiles.ENV_PROFILE}, ini tokperf_profile; "
        f"default {profiles.DEFAULT_PROFILE}): {', '.join(sorted(profiles.BUILTIN))}",
    )
    group.addoption(
        "--tokperf-json",
        metavar="PATH",
        help="write self-describing JSON results here (env TOKPERF_JSON, ini tokperf_json)",
    )
    group.addoption(
        "--tokperf-model-path",
        metavar="PATH",
        help="GGUF model for the embedded engine instead of the shipped SmolLM2-135M "
        "(env TOKPERF_MODEL_PATH, ini tokperf_model_path)",
    )
    group.addoption(
        "--tokperf-requests",
        metavar="N",
        help="requests per run when a test does not say (env TOKPERF_REQUESTS, "
        "ini tokperf_requests; default: the profile's)",
    )
    group.addoption(
        "--tokperf-max-tokens",
        metavar="N",
        help="max new tokens per request when neither the test nor the prompt says "
        "(env TOKPERF_MAX_TOKENS, ini tokperf_max_tokens; default: the profile's)",
    )
    group.addoption(
        "--tokperf-gpus",
        metavar="N",
        help="GPUs to allocate to each process instead of the profile's "
        "(env TOKPERF_GPUS, ini tokperf_gpus)",
    )
    group.addoption(
        "--tokperf-allow-busy-gpus",
        action="store_true",
        help="allocate GPUs that run other processes' compute work "
        "(env TOKPERF_ALLOW_BUSY_GPUS, ini tokperf_allow_busy_gpus)",
    )
    group.addoption(
        "--tokperf-require-hardware",
        action="store_true",
        help="error instead of skipping when the profile's GPUs are missing or taken "
        "(env TOKPERF_REQUIRE_HARDWARE, ini tokperf_require_hardware)",
    )
    group.addoption(
        "--tokperf-lock-dir",
        metavar="DIR",
        help="directory of the per-GPU lock files every tokperf process on this machine "
        f"shares (env TOKPERF_LOCK_DIR, ini tokperf_lock_dir; default {gpus.DEFAULT_LOCK_DIR})",
    )
    parser.addini("tokperf_profile", "tokperf hardware profile", default="")
    parser.addini("tokperf_gpus", "tokperf GPUs per process", default="")
    parser.addini("tokperf_allow_busy_gpus", "tokperf: allocate busy GPUs", default="")
    parser.addini("tokperf_require_hardware", "tokperf: error on missing GPUs", default="")
    parser.addini("tokperf_lock_dir", "tokperf GPU lock directory", default="")
    parser.addini("tokperf_requests", "tokperf requests per run", default="")
    parser.addini("tokperf_max_tokens", "tokperf max new tokens per request", default="")
    parser.addini("tokperf_json", "path of the tokperf JSON results", default="")
    parser.addini("tokperf_model_path", "GGUF model for the embedded engine", default="")


def _setting(config: pytest.Config, name: str) -> tuple[str, str] | None:
    """(value, where it came from) for option/env/ini `name`, or None when unset."""
    option = config.getoption(name)
    env = os.environ.get(name.upper())
    ini = config.getini(name)
    if option:
        return option, "--" + name.replace("_", "-")
    if env:
        return env, f"environment variable {name.upper()}"
    if ini:
        return ini, f"ini option {name} in {config.inipath}"
    return None


def _positive_int(config: pytest.Config, name: str) -> int | None:
    setting = _setting(config, name)
    if setting is None:
        return None
    value, source = setting
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise pytest.UsageError(f"{source} must be a positive integer, got {value!r}")
    return number


FLAGS = {"1": True, "true": True, "yes": True, "on": True,
         "0": False, "false": False, "no": False, "off": False, "": False}  # fmt: skip


def _flag(config: pytest.Config, name: str) -> bool:
    setting = _setting(config, name)
    if setting is None:
        return False
    value, source = setting
    if isinstance(value, bool):  # the command-line flag itself
        return value
    if value.strip().lower() not in FLAGS:
        raise pytest.UsageError(f"{source} must be true or false (1/0, yes/no), got {value!r}")
    return FLAGS[value.strip().lower()]


class TokperfSession:
    """Per-process state, registered as a plugin (never kept in globals)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        ini_profile = config.getini("tokperf_profile")
        self.registry = profiles.load_user(config.rootpath)
        self.nvml, why_not = gpus.load_nvml()
        self.inventory = gpus.read_inventory(self.nvml, why_not)
        self.profile, self.profile_source = profiles.select(
            config.getoption("tokperf_profile"),
            ini_profile,
            str(config.inipath),
            self.registry,
            self.inventory,
        )
        self.gpu_count = _positive_int(config, "tokperf_gpus")
        self.allow_busy = _flag(config, "tokperf_allow_busy_gpus")
        self.require_hardware = _flag(config, "tokperf_require_hardware")
        lock_dir = _setting(config, "tokperf_lock_dir")
        self.lock_dir = Path(lock_dir[0]) if lock_dir else gpus.DEFAULT_LOCK_DIR
        requests = _positive_int(config, "tokperf_requests")
        max_tokens = _positive_int(config, "tokperf_max_tokens")
        self.profile = dataclasses.replace(
            self.profile,
            requests=requests or self.profile.requests,
            max_tokens=max_tokens or self.profile.max_tokens,
        )
        json_setting = _setting(config, "tokperf_json")
        self.json_path = Path(json_setting[0]) if json_setting else None
        self.model_path: Path | None = None
        model = _setting(config, "tokperf_model_path")
        if model is not None:
            self.model_path = Path(model[0])
            if not self.model_path.is_file():
                raise pytest.UsageError(
                    f"model file {model[0]!r} (from {model[1]}) does not exist; "
                    "give the path of a GGUF file"
                )
        # xdist's documented marker of a worker process
        self.is_worker = hasattr(config, "workerinput")
        self.payloads: list[dict[str, Any]] = []

    def engine_settings(self) -> dict[str, Any]:
        settings = dict(self.profile.engine)
        if self.profile.tensor_parallel_size > 1:
            settings["tensor_parallel_size"] = self.profile.tensor_parallel_size
        if self.model_path is not None:
            settings["model_path"] = str(self.model_path)
        return settings

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        p = self.profile
        model = self.model_path.name if self.model_path else f"{p.model} {p.precision}"
        unit = "GPU" if p.device_kind == "gpu" else "device"
        # --tokperf-gpus changes what a GPU profile allocates; the cpu profile is one device
        devices = (self.gpu_count or p.devices) if p.device_kind == "gpu" else p.devices
        return [
            f"tokperf: profile {p.name} ({self.profile_source}), engine {p.backend}, "
            f"model {model}, {devices} {unit}{'' if devices == 1 else 's'}",
            f"tokperf: GPUs: {self.inventory.describe()}",
        ]

    def allocate(self) -> gpus.Allocation:
        """This process's GPUs for the profile (the CPU device for a cpu profile).

        Not enough suitable free GPUs skips the tests that need them, or fails them
        with --tokperf-require-hardware.
        """
        if self.profile.device_kind != "gpu":
            return gpus.Allocation()
        need = self.profile.need(self.gpu_count)
        try:
            return gpus.allocate(self.inventory, need, self.lock_dir, self.allow_busy)
        except gpus.Shortage as exc:
            if self.require_hardware:
                pytest.fail(f"{exc} (--tokperf-require-hardware)", pytrace=False)
            pytest.skip(str(exc))

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # validate every marker before anything runs: a typo is a usage error, not a skip
        for item in items:
            marker = item.get_closest_marker("throughput_floor")
            if marker is not None:
                item.stash[BOUNDS] = verdict.parse_floor_marker(
                    marker.args, marker.kwargs, item.nodeid, self.registry
                )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        yield  # the test body; if it raised, that is the outcome and nothing below runs
        runner = item.stash.get(RUNNER, None)
        floors = item.stash.get(FLOORS, None)
        if runner is None:
            return
        if floors is not None and runner.last is None:
            runner.run()  # the marked test never ran a workload: run the profile's default
        result = runner.last
        if result is None:
            return
        outcome = verdict.judge(result, floors or {})
        data = report.payload(
            item.nodeid, result, outcome, floors or {}, self.profile, gpus=runner.gpus
        )
        if floors is None:
            data["verdict"] = "MEASURED"  # no floor: reported, not gated
        item.user_properties.append((report.PROPERTY, json.dumps(data)))
        if floors is not None and outcome.status == "FAIL":
            pytest.fail(report.failure_message(data), pytrace=False)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        rep = yield
        # a perf test skipped in setup for want of GPUs (the session-scoped allocation
        # runs before any function fixture) still gets its row in the results
        skip = call.excinfo.value if call.excinfo is not None else None
        if (
            rep.when == "setup"
            and isinstance(skip, pytest.skip.Exception)
            and BOUNDS in item.stash
            and all(name != PROPERTY for name, _ in rep.user_properties)
        ):
            data = report.skipped(item.nodeid, self.profile, str(skip.msg))
            rep.user_properties.append((PROPERTY, json.dumps(data)))
        return rep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when not in ("setup", "call"):
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                self.payloads.append(json.loads(str(value)))

    def pytest_sessionfinish(self) -> None:
        if self.json_path is not None and not self.is_worker:
            doc = report.document(
                self._sorted(), self.profile, self.profile_source, inventory=self.inventory
            )
            report.write_json(self.json_path, doc)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.is_worker or not self.payloads:
            return
        terminalreporter.section("tokperf")
        for line in report.table(self._sorted()):
            terminalreporter.write_line(line)
        if self.json_path is not None:
            terminalreporter.write_line(f"results: {self.json_path}")

    def _sorted(self) -> list[dict[str, Any]]:
        return sorted(self.payloads, key=lambda p: str(p["nodeid"]))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", FLOOR_MARKER)
    config.pluginmanager.register(TokperfSession(config), "tokperf-session")


def _session(config: pytest.Config) -> TokperfSession:
    plugin = config.pluginmanager.get_plugin("tokperf-session")
    assert isinstance(plugin, TokperfSession)
    return plugin


@pytest.fixture(scope="session")
def tokperf_gpus(pytestconfig: pytest.Config) -> Iterator[gpus.Allocation]:
    """This process's GPUs, locked for the session; CUDA_VISIBLE_DEVICES names them.

    Each xdist worker gets a disjoint set. Without enough suitable free GPUs the
    tests that need them skip (or fail with --tokperf-require-hardware).
    """
    allocation = _session(pytestconfig).allocate()
    try:
        # by UUID: NVML's order may differ from CUDA's; set before any engine loads
        with gpus.cuda_visible(allocation):
            yield allocation
    finally:
        allocation.release()


@pytest.fixture(scope="session")
def tokperf_engine(pytestconfig: pytest.Config, tokperf_gpus: gpus.Allocation) -> Iterator[Engine]:
    """The profile's engine on this process's allocation (once per xdist worker)."""
    state = _session(pytestconfig)
    backend = state.profile.backend
    if backend not in BACKENDS:
        pytest.fail(
            f"tokperf profile {state.profile.name!r} ({state.profile_source}) runs the "
            f"{backend!r} engine, which this version of pytest-tokperf does not include; "
            f"available engines: {', '.join(sorted(BACKENDS))} (profile 'cpu')",
            pytrace=False,
        )
    try:
        engine = load_engine(backend, state.engine_settings(), tokperf_gpus.devices)
    except EngineError as exc:
        pytest.fail(f"tokperf could not load its engine: {exc}", pytrace=False)
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture
def tokperf(
    request: pytest.FixtureRequest, tokperf_engine: Engine, tokperf_gpus: gpus.Allocation
) -> Tokperf:
    """Runs measured workloads: `tokperf.run(scenario="offline", requests=N, max_tokens=M)`."""
    state = _session(request.config)
    runner = Tokperf(
        tokperf_engine,
        state.profile,
        telemetry=lambda: gpus.Sampler(state.nvml, tokperf_gpus.uuids),
        gpus=tokperf_gpus.uuids,
    )
    request.node.stash[RUNNER] = runner
    return runner


@pytest.fixture(autouse=True)
def _tokperf_floor(request: pytest.FixtureRequest) -> None:
    """For tests marked throughput_floor: skip without a floor here, else load the engine."""
    bounds = request.node.stash.get(BOUNDS, None)
    if bounds is None:
        return
    profile = _session(request.config).profile
    floors = verdict.floors_for(bounds, profile.name, profile.floors)
    if isinstance(floors, str):
        data = report.skipped(request.node.nodeid, profile, floors)
        request.node.user_properties.append((PROPERTY, json.dumps(data)))
        pytest.skip(floors)
    request.node.stash[FLOORS] = floors
    request.getfixturevalue("tokperf")
