"""The pytest11 entry point: options, markers, fixtures and hooks, kept thin.

Precedence of every setting, written down once: marker > command line >
environment > ini > profile default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_tokperf import (
    accuracy,
    driver,
    gpus,
    launcher,
    metrics,
    precision,
    procs,
    profiles,
    report,
    verdict,
)
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import BACKENDS, Engine, EngineError, load_engine
from pytest_tokperf.runner import Progress, Tokperf

BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
FLOORS = pytest.StashKey[dict[str, float]]()
SLO_BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
SLOS = pytest.StashKey[dict[str, float]]()
RUNNER = pytest.StashKey[Tokperf]()
PARITY = pytest.StashKey[accuracy.ParitySpec]()
PROPERTY = report.PROPERTY
FLOOR_MARKER = (
    "throughput_floor(min_tokens_per_s=None, per_gpu=None): fail the test unless its last "
    "tokperf run reaches these output tokens/s floors; each a number or a dict keyed by "
    "profile name (a profile missing from the dict skips the test)"
)
PARITY_MARKER = (
    "accuracy_parity(reference=None, rouge_ratio=0.99, tokens_per_sample=(0.9, 1.1), "
    "max_kl=None, min_top1=None, dataset=None): fail the test unless the engine's answers "
    "match the reference precision's by MLPerf's ROUGE rule (and the optional KL / top-1 "
    "limits); runs tokperf.accuracy() after the body if the test did not"
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
        "--tokperf-engine",
        metavar="BACKEND",
        help="engine backend instead of the profile's (env TOKPERF_ENGINE, ini tokperf_engine): "
        f"{', '.join(sorted(BACKENDS))}",
    )
    group.addoption(
        "--tokperf-base-url",
        metavar="URL",
        help="OpenAI-compatible server for the openai engine, e.g. http://127.0.0.1:8000 "
        "(env TOKPERF_BASE_URL, ini tokperf_base_url)",
    )
    group.addoption(
        "--tokperf-served-model",
        metavar="NAME",
        help="model name on that server (env TOKPERF_SERVED_MODEL, ini tokperf_served_model; "
        "default: the first it lists)",
    )
    group.addoption(
        "--tokperf-server-cmd",
        metavar="CMD",
        help="start this server for the session and stop it at the end, e.g. "
        "'trtllm-serve MODEL --tp_size 4' (env TOKPERF_SERVER_CMD, ini tokperf_server_cmd)",
    )
    group.addoption(
        "--tokperf-tokenizer",
        metavar="PATH",
        help="count the openai engine's output tokens with this GGUF file or tokenizer.json "
        "when the server sends no usage and has no tokenize endpoint "
        "(env TOKPERF_TOKENIZER, ini tokperf_tokenizer)",
    )
    parser.addini("tokperf_tokenizer", "GGUF file whose tokenizer counts tokens", default="")
    group.addoption(
        "--tokperf-client-procs",
        metavar="N",
        help="issue and stream from N client processes (openai engine), or 'auto' from the "
        "offered load (env TOKPERF_CLIENT_PROCS, ini tokperf_client_procs; default 1)",
    )
    parser.addini("tokperf_client_procs", "tokperf client processes", default="")
    group.addoption(
        "--tokperf-precision",
        metavar="NAME",
        help="precision of the engine under test (env TOKPERF_PRECISION, ini "
        "tokperf_precision; default: the profile's); embedded engine: "
        f"{', '.join(precision.VARIANTS)}, built on first use into the cache",
    )
    parser.addini("tokperf_precision", "tokperf precision of the engine under test", default="")
    parser.addini("tokperf_engine", "tokperf engine backend", default="")
    parser.addini("tokperf_base_url", "OpenAI-compatible server URL", default="")
    parser.addini("tokperf_served_model", "model name on the server", default="")
    parser.addini("tokperf_server_cmd", "server command the session starts", default="")
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


def _client_procs(config: pytest.Config) -> int:
    """Client processes: N, or 0 for `auto` (decided per run from the offered load)."""
    setting = _setting(config, "tokperf_client_procs")
    if setting is None:
        return 1
    if setting[0] == "auto":
        return 0
    return _positive_int(config, "tokperf_client_procs") or 1


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
        engine = _setting(config, "tokperf_engine")
        self.backend = engine[0] if engine else self.profile.backend
        if self.backend not in BACKENDS:
            raise pytest.UsageError(
                f"unknown engine {self.backend!r} (from {engine[1] if engine else 'profile'}); "
                f"available: {', '.join(sorted(BACKENDS))}"
            )
        precision_setting = _setting(config, "tokperf_precision")
        if precision_setting is not None:
            value, source = precision_setting
            known = self.precisions()
            if known is not None and value not in known:
                raise pytest.UsageError(
                    f"{source}: unknown precision {value!r} for the {self.backend} "
                    f"engine; available: {', '.join(known)}"
                )
            self.profile = dataclasses.replace(self.profile, precision=value)
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
        self.server_settings = {
            key: value
            for key, name in (
                ("base_url", "tokperf_base_url"),
                ("model", "tokperf_served_model"),
                ("tokenizer", "tokperf_tokenizer"),
            )
            if (value := (_setting(config, name) or ("", ""))[0])
        }
        server_cmd = _setting(config, "tokperf_server_cmd")
        self.server_cmd = server_cmd[0] if server_cmd else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server: launcher.Server | None = None
        self.client_procs = _client_procs(config)  # 0: auto
        self.spawn: procs.Spawn | None = None  # how a client process loads the engine
        self.inconclusive = _inconclusive_policy(config)
        self.confidence = _confidence(config)
        # xdist's documented marker of a worker process
        self.is_worker = hasattr(config, "workerinput")
        self.payloads: list[dict[str, Any]] = []
        self.references: dict[str, Engine] = {}  # reference engines by precision, lazily

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """One event loop for the process: engines keep their connection pools on it."""
        if self._loop is None or self._loop.is_closed():
            self._loop = driver.new_loop()
        return self._loop

    def precisions(self) -> tuple[str, ...] | None:
        """The precisions the backend can load (None: it decides itself)."""
        return precision.VARIANTS if self.backend == "llamacpp" else None

    def engine_settings(self, at: str | None = None) -> dict[str, Any]:
        settings = dict(self.profile.engine) if self.backend == self.profile.backend else {}
        if self.backend == "trtllm":
            settings.setdefault("model", self.profile.model)  # a user profile's checkpoint
            if self.profile.tensor_parallel_size > 1:
                settings["tensor_parallel_size"] = self.profile.tensor_parallel_size
        if self.backend == "llamacpp":
            if self.model_path is not None:
                settings["model_path"] = str(self.model_path)
            settings["precision"] = at or self.profile.precision
        if self.backend == "openai":
            settings.update(self.server_settings)
        return settings

    def reference_engine(self, at: str) -> Engine:
        """The same backend and model at precision `at`, loaded once per process."""
        if at not in self.references:
            try:
                self.references[at] = load_engine(
                    self.backend, self.engine_settings(at), self.profile.devices
                )
            except EngineError as exc:
                pytest.fail(f"tokperf could not load its {at} reference engine: {exc}", False)
        return self.references[at]

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        p = self.profile
        model = self.model_path.name if self.model_path else f"{p.model} {p.precision}"
        if self.backend == "openai":
            url = self.server_settings.get("base_url", "no --tokperf-base-url")
            model = f"{self.server_settings.get('model', 'first served')} at {url}"
        unit = "GPU" if p.device_kind == "gpu" else "device"
        # --tokperf-gpus changes what a GPU profile allocates; the cpu profile is one device
        devices = (self.gpu_count or p.devices) if p.device_kind == "gpu" else p.devices
        return [
            f"tokperf: profile {p.name} ({self.profile_source}), engine {self.backend}, "
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
            parity = item.get_closest_marker("accuracy_parity")
            if parity is not None:
                item.stash[PARITY] = accuracy.parse_parity_marker(
                    parity.args, parity.kwargs, item.nodeid, self.precisions()
                )
            marker = item.get_closest_marker("latency_slo")
            if marker is not None:
                item.stash[SLO_BOUNDS] = verdict.parse_slo_marker(
                    marker.args, marker.kwargs, item.nodeid, self.registry
                )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        yield  # the test body; if it raised, that is the outcome and nothing below runs
        runner = item.stash.get(RUNNER, None)
        floors = item.stash.get(FLOORS, None)
        slos = item.stash.get(SLOS, None)
        if runner is None:
            return
        if PARITY in item.stash:
            self._judge_parity(item, runner)
        elif runner.last_parity is not None:  # tokperf.accuracy() without the marker
            data = report.parity_payload(item.nodeid, runner.last_parity, self.profile)
            data["verdict"] = "MEASURED"  # reported, not gated
            item.user_properties.append((report.PROPERTY, json.dumps(data)))
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
        data = report.payload(
            item.nodeid, result, outcome, floors or {}, self.profile, slos, good, gpus=runner.gpus
        )
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

    def _judge_parity(self, item: pytest.Item, runner: Tokperf) -> None:
        """A marked parity test: its last accuracy result (run one if it ran none)."""
        if runner.last_parity is None:
            try:
                runner.accuracy()
            except accuracy.ParityError as exc:
                pytest.fail(f"accuracy parity could not be scored: {exc}", pytrace=False)
        result = runner.last_parity
        assert result is not None
        data = report.parity_payload(item.nodeid, result, self.profile)
        item.user_properties.append((report.PROPERTY, json.dumps(data)))
        if not result.passed:
            pytest.fail(report.parity_message(data), pytrace=False)

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
            and (BOUNDS in item.stash or SLO_BOUNDS in item.stash)
            and all(name != PROPERTY for name, _ in rep.user_properties)
        ):
            data = report.skipped(item.nodeid, self.profile, str(skip.msg))
            rep.user_properties.append((PROPERTY, json.dumps(data)))
        if rep.failed and self.server is not None:
            # a failing perf test against a launched server gets that server's log
            rep.sections.append(("tokperf server log (tail)", self.server.log_tail()))
        return rep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when not in ("setup", "call"):
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                self.payloads.append(json.loads(str(value)))

    def pytest_sessionfinish(self) -> None:
        for engine in self.references.values():
            self.loop.run_until_complete(engine.aclose())
        self.references.clear()
        if self.server is not None:
            self.server.stop()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
        if self.json_path is not None and not self.is_worker:
            doc = report.document(
                self._sorted(), self.profile, self.profile_source, inventory=self.inventory
            )
            report.write_json(self.json_path, doc)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.is_worker or not self.payloads:
            return
        terminalreporter.section("tokperf")
        perf = [p for p in self._sorted() if p.get("kind") != report.PARITY_KIND]
        parity = [p for p in self._sorted() if p.get("kind") == report.PARITY_KIND]
        for line in report.table(perf) if perf else []:
            terminalreporter.write_line(line)
        for line in report.parity_table(parity) if parity else []:
            terminalreporter.write_line(line)
        if self.json_path is not None:
            terminalreporter.write_line(f"results: {self.json_path}")

    def _sorted(self) -> list[dict[str, Any]]:
        return sorted(self.payloads, key=lambda p: str(p["nodeid"]))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", FLOOR_MARKER)
    config.addinivalue_line("markers", PARITY_MARKER)
    config.addinivalue_line("markers", SLO_MARKER)
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
    settings = state.engine_settings()
    try:
        if state.server_cmd is not None:
            state.server = launcher.start(state.server_cmd, settings.get("base_url"))
            settings["base_url"] = state.server.base_url
        engine = load_engine(state.backend, settings, tokperf_gpus.devices)
        state.spawn = procs.Spawn(state.backend, settings, tokperf_gpus.devices)
    except (EngineError, launcher.LaunchError) as exc:
        pytest.fail(f"tokperf could not load its engine: {exc}", pytrace=False)
    yield engine
    state.loop.run_until_complete(engine.aclose())


@pytest.fixture(scope="session")
def tokperf_reference_engine(pytestconfig: pytest.Config) -> Engine:
    """The same backend and model at the profile's reference precision, loaded lazily
    (once per process; closed at the end of the session)."""
    state = _session(pytestconfig)
    at = state.profile.reference_precision
    if at is None:
        pytest.fail(f"tokperf profile {state.profile.name!r} names no reference_precision", False)
    return state.reference_engine(at)


@pytest.fixture
def tokperf(
    request: pytest.FixtureRequest, tokperf_engine: Engine, tokperf_gpus: gpus.Allocation
) -> Tokperf:
    """Runs measured workloads: `tokperf.run(scenario="offline", requests=N, max_tokens=M)`
    (also server/interactive with qps=, concurrency with concurrency=), and accuracy
    parity: `tokperf.accuracy(dataset=..., samples=N)`."""
    state = _session(request.config)
    runner = Tokperf(
        tokperf_engine,
        state.profile,
        state.loop,
        reference=state.reference_engine,
        telemetry=lambda: gpus.Sampler(state.nvml, tokperf_gpus.uuids),
        gpus=tokperf_gpus.uuids,
        client_procs=state.client_procs,
        spawn=state.spawn,
    )
    spec = request.node.stash.get(PARITY, None)
    if spec is not None:
        runner.parity_spec = spec
    runner.confidence = state.confidence
    runner.floors = request.node.stash.get(FLOORS, {})
    runner.progress = state.progress()
    request.node.stash[RUNNER] = runner
    return runner


@pytest.fixture(autouse=True)
def _tokperf_parity(request: pytest.FixtureRequest) -> None:
    """Tests marked accuracy_parity get the runner even when they do not ask for it."""
    if PARITY in request.node.stash:
        request.getfixturevalue("tokperf")


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
