"""The pytest11 entry point: options, markers, fixtures and hooks, kept thin.

Precedence of every setting, written down once: marker > command line >
environment > ini > profile default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_tokperf import metrics, profiles, report, verdict
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import Engine, EngineError, load_engine
from pytest_tokperf.runner import Progress, Tokperf

BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
FLOORS = pytest.StashKey[dict[str, float]]()
SLO_BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
SLOS = pytest.StashKey[dict[str, float]]()
RUNNER = pytest.StashKey[Tokperf]()
PROPERTY = report.PROPERTY
FLOOR_MARKER = (
    "throughput_floor(min_tokens_per_s=None, per_gpu=None): fail the test unless its last "
    "tokperf run reaches these output tokens/s floors; each a number or a dict keyed by "
    "profile name (a profile missing from the dict skips the test)"
)
SLO_MARKER = (
    "latency_slo(ttft_p99_ms=None, tpot_p99_ms=None, ...): fail the test unless its last "
    "tokperf run keeps these latency percentiles (metric ttft/tpot/itl/e2e, percentile "
    "p50/p90/p95/p99/p999) under the limit in ms; each a number or a dict keyed by "
    "profile name; no keywords: the profile's defaults for the run's scenario"
)
INCONCLUSIVE_POLICIES = ("fail", "skip", "pass")
PROGRESS_AFTER_S = 3.0  # runs shorter than this print no progress line
PROGRESS_EVERY_S = 5.0


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
        "--tokperf-inconclusive",
        metavar="POLICY",
        help="what an INCONCLUSIVE floor verdict does to the test: fail, skip or pass "
        "(env TOKPERF_INCONCLUSIVE, ini tokperf_inconclusive; default fail)",
    )
    group.addoption(
        "--tokperf-confidence",
        metavar="LEVEL",
        help="confidence of the throughput intervals, between 0.5 and 1 "
        "(env TOKPERF_CONFIDENCE, ini tokperf_confidence; default 0.95)",
    )
    parser.addini("tokperf_inconclusive", "tokperf INCONCLUSIVE policy", default="")
    parser.addini("tokperf_confidence", "tokperf confidence level", default="")
    parser.addini("tokperf_profile", "tokperf hardware profile", default="")
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


def _inconclusive_policy(config: pytest.Config) -> str:
    setting = _setting(config, "tokperf_inconclusive")
    if setting is None:
        return "fail"
    value, source = setting
    if value not in INCONCLUSIVE_POLICIES:
        raise pytest.UsageError(
            f"{source} must be one of {', '.join(INCONCLUSIVE_POLICIES)}, got {value!r}"
        )
    return value


def _confidence(config: pytest.Config) -> float:
    setting = _setting(config, "tokperf_confidence")
    if setting is None:
        return 0.95
    value, source = setting
    try:
        level = float(value)
    except ValueError:
        level = 0.0
    if not 0.5 <= level < 1:
        raise pytest.UsageError(
            f"{source} must be a number from 0.5 up to (not including) 1, such as 0.95; "
            f"got {value!r}"
        )
    return level


class TokperfSession:
    """Per-process state, registered as a plugin (never kept in globals)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        ini_profile = config.getini("tokperf_profile")
        self.profile, self.profile_source = profiles.select(
            config.getoption("tokperf_profile"), ini_profile, str(config.inipath)
        )
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
        self.inconclusive = _inconclusive_policy(config)
        self.confidence = _confidence(config)
        # xdist's documented marker of a worker process
        self.is_worker = hasattr(config, "workerinput")
        self.payloads: list[dict[str, Any]] = []

    def engine_settings(self) -> dict[str, Any]:
        settings = dict(self.profile.engine)
        if self.model_path is not None:
            settings["model_path"] = str(self.model_path)
        return settings

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        p = self.profile
        model = self.model_path.name if self.model_path else f"{p.model} {p.precision}"
        unit = "GPU" if p.device_kind == "gpu" else "device"
        return [
            f"tokperf: profile {p.name} ({self.profile_source}), engine {p.backend}, "
            f"model {model}, {p.devices} {unit}{'' if p.devices == 1 else 's'}"
        ]

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # validate every marker before anything runs: a typo is a usage error, not a skip
        for item in items:
            marker = item.get_closest_marker("throughput_floor")
            if marker is not None:
                item.stash[BOUNDS] = verdict.parse_floor_marker(
                    marker.args, marker.kwargs, item.nodeid, profiles.BUILTIN
                )
            marker = item.get_closest_marker("latency_slo")
            if marker is not None:
                item.stash[SLO_BOUNDS] = verdict.parse_slo_marker(
                    marker.args, marker.kwargs, item.nodeid, profiles.BUILTIN
                )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        yield  # the test body; if it raised, that is the outcome and nothing below runs
        runner = item.stash.get(RUNNER, None)
        floors = item.stash.get(FLOORS, None)
        slos = item.stash.get(SLOS, None)
        if runner is None:
            return
        gated = floors is not None or slos is not None
        if gated and runner.last is None:
            runner.run()  # the marked test never ran a workload: run the profile's default
        result = runner.last
        if result is None:
            return
        if slos == {}:  # a bare latency_slo(): the profile's limits for this scenario
            slos = dict(self.profile.slos.get(result.scenario, {}))
            if not slos:
                pytest.fail(
                    f"latency_slo() without limits: profile {self.profile.name!r} has no "
                    f"default SLOs for the {result.scenario} scenario; give limits such as "
                    "ttft_p99_ms=...",
                    pytrace=False,
                )
        outcome = verdict.judge(
            result, floors or {}, slos, confidence=self.confidence, looks=runner.looks[-1]
        )
        good = result.goodput(verdict.per_request_limits(slos)) if slos else None
        data = report.payload(item.nodeid, result, outcome, floors or {}, self.profile, slos, good)
        if not gated:
            data["verdict"] = "MEASURED"  # no floor and no SLO: reported, not gated
        item.user_properties.append((report.PROPERTY, json.dumps(data)))
        if not gated:
            return
        if outcome.status in ("FAIL", "INVALID"):
            pytest.fail(report.failure_message(data), pytrace=False)
        if outcome.status == "INCONCLUSIVE":
            if self.inconclusive == "fail":
                pytest.fail(report.failure_message(data), pytrace=False)
            if self.inconclusive == "skip":
                pytest.skip(report.failure_message(data))

    def progress(self) -> Progress | None:
        """The live line's callback, or None where it must stay quiet."""
        if self.is_worker or self.config.get_verbosity() < 0:
            return None
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if terminal is None:
            return None
        shown = [-PROGRESS_EVERY_S]  # when the last line was shown
        confidence = self.confidence

        def show(snapshot: Sequence[RequestRecord], elapsed_s: float) -> None:
            if elapsed_s < PROGRESS_AFTER_S or elapsed_s - shown[0] < PROGRESS_EVERY_S:
                return
            shown[0] = elapsed_s
            # requests in flight end "now" in a snapshot, the latest end of all
            now = max((r.end_ns for r in snapshot), default=0)
            done = sum(1 for r in snapshot if r.end_ns < now)
            line = report.progress_line(
                elapsed_s,
                done,
                len(snapshot),
                metrics.output_tokens_per_s(snapshot),
                metrics.throughput_interval(snapshot, confidence),
            )
            # like pytest's live logging: write past the capture to the real terminal
            if capture is not None:
                with capture.global_and_fixture_disabled():
                    terminal.write_line(line)
            else:
                terminal.write_line(line)

        return show

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when not in ("setup", "call"):
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                self.payloads.append(json.loads(str(value)))

    def pytest_sessionfinish(self) -> None:
        if self.json_path is not None and not self.is_worker:
            doc = report.document(self._sorted(), self.profile, self.profile_source)
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
    config.addinivalue_line("markers", SLO_MARKER)
    config.pluginmanager.register(TokperfSession(config), "tokperf-session")


def _session(config: pytest.Config) -> TokperfSession:
    plugin = config.pluginmanager.get_plugin("tokperf-session")
    assert isinstance(plugin, TokperfSession)
    return plugin


@pytest.fixture(scope="session")
def tokperf_engine(pytestconfig: pytest.Config) -> Iterator[Engine]:
    """The profile's engine, loaded once per process (once per xdist worker)."""
    state = _session(pytestconfig)
    try:
        engine = load_engine(state.profile.backend, state.engine_settings(), state.profile.devices)
    except EngineError as exc:
        pytest.fail(f"tokperf could not load its engine: {exc}", pytrace=False)
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture
def tokperf(request: pytest.FixtureRequest, tokperf_engine: Engine) -> Tokperf:
    """Runs measured workloads: `tokperf.run(scenario="offline", requests=N, max_tokens=M)`."""
    state = _session(request.config)
    runner = Tokperf(tokperf_engine, state.profile)
    runner.confidence = state.confidence
    runner.floors = request.node.stash.get(FLOORS, {})
    runner.progress = state.progress()
    request.node.stash[RUNNER] = runner
    return runner


@pytest.fixture(autouse=True)
def _tokperf_floor(request: pytest.FixtureRequest) -> None:
    """For tests marked throughput_floor or latency_slo: skip without a bound for this
    profile, else load the engine."""
    bounds = request.node.stash.get(BOUNDS, None)
    slo_bounds = request.node.stash.get(SLO_BOUNDS, None)
    if bounds is None and slo_bounds is None:
        return
    profile = _session(request.config).profile
    floors = None if bounds is None else verdict.floors_for(bounds, profile.name, profile.floors)
    # a bare latency_slo() resolves to {} here and to the scenario's defaults after the run
    slos = (
        None
        if slo_bounds is None
        else verdict.floors_for(slo_bounds, profile.name, {}, marker="latency_slo")
    )
    for reason in (floors, slos):
        if isinstance(reason, str):
            data = report.skipped(request.node.nodeid, profile, reason)
            request.node.user_properties.append((PROPERTY, json.dumps(data)))
            pytest.skip(reason)
    if isinstance(floors, dict):
        request.node.stash[FLOORS] = floors
    if isinstance(slos, dict):
        request.node.stash[SLOS] = slos
    runner = request.getfixturevalue("tokperf")
    runner.floors = floors or {}
