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
    acknowledged,
    baseline,
    driver,
    gpus,
    launcher,
    markers,
    metrics,
    precision,
    procs,
    profiles,
    rack,
    rackjudge,
    records,
    reference,
    report,
    results,
    settings,
    summary,
    verdict,
    workloads,
)
from pytest_tokperf.driver import RequestRecord
from pytest_tokperf.engines import BACKENDS, Engine, EngineError, load_engine
from pytest_tokperf.runner import Progress, Tokperf

BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
FLOORS = pytest.StashKey[dict[str, float]]()
SLO_BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
SLOS = pytest.StashKey[dict[str, float]]()
RACK_FLOOR = pytest.StashKey[float]()
RUNNER = pytest.StashKey[Tokperf]()
PARITY = pytest.StashKey[accuracy.ParitySpec]()
NO_REGRESSION = pytest.StashKey[dict[str, float | None]]()
PROPERTY = report.PROPERTY
PROGRESS_AFTER_S = 3.0  # runs shorter than this print no progress line
PROGRESS_EVERY_S = 5.0


def pytest_addoption(parser: pytest.Parser) -> None:
    settings.add_options(parser)


class TokperfSession:
    """Per-process state, registered as a plugin (never kept in globals)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        ini_profile = config.getini("tokperf_profile")
        self.registry = profiles.load_user(config.rootpath)
        self.nvml, why_not = gpus.load_nvml()
        # an outer scheduler's CUDA_VISIBLE_DEVICES: only those GPUs are ours to take
        self.inventory = gpus.read_inventory(self.nvml, why_not).restrict(
            os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        self.unmatched: str | None = None  # GPUs no profile matches: tokperf tests stop
        try:
            self.profile, self.profile_source = profiles.select(
                config.getoption("tokperf_profile"),
                ini_profile,
                str(config.inipath),
                self.registry,
                self.inventory,
            )
        except profiles.Unmatched as exc:
            self.unmatched = str(exc)
            self.profile, self.profile_source = self.registry["cpu"], "not used"
        self.gpu_wait = settings.seconds(config, "tokperf_gpu_wait")
        self.allocation: gpus.Allocation | None = None
        self.gpu_count = settings.positive_int(config, "tokperf_gpus")
        self.allow_busy = settings.flag(config, "tokperf_allow_busy_gpus")
        self.require_hardware = settings.flag(config, "tokperf_require_hardware")
        lock_dir = settings.setting(config, "tokperf_lock_dir")
        self.lock_dir = Path(lock_dir[0]) if lock_dir else gpus.DEFAULT_LOCK_DIR
        requests = settings.positive_int(config, "tokperf_requests")
        max_tokens = settings.positive_int(config, "tokperf_max_tokens")
        self.profile = dataclasses.replace(
            self.profile,
            requests=requests or self.profile.requests,
            max_tokens=max_tokens or self.profile.max_tokens,
        )
        engine = settings.setting(config, "tokperf_engine")
        self.backend = engine[0] if engine else self.profile.backend
        if self.backend not in BACKENDS:
            raise pytest.UsageError(
                f"unknown engine {self.backend!r} (from {engine[1] if engine else 'profile'}); "
                f"available: {', '.join(sorted(BACKENDS))}"
            )
        precision_setting = settings.setting(config, "tokperf_precision")
        if precision_setting is not None:
            value, source = precision_setting
            known = self.precisions()
            if known is not None and value not in known:
                raise pytest.UsageError(
                    f"{source}: unknown precision {value!r} for the {self.backend} "
                    f"engine; available: {', '.join(known)}"
                )
            self.profile = dataclasses.replace(self.profile, precision=value)
        json_setting = settings.setting(config, "tokperf_json")
        self.json_path = Path(json_setting[0]) if json_setting else None
        self.model_path: Path | None = None
        model = settings.setting(config, "tokperf_model_path")
        if model is not None:
            self.model_path = Path(model[0])
            folder = self.backend == "transformers" and self.model_path.is_dir()
            if not (self.model_path.is_file() or folder):
                raise pytest.UsageError(
                    f"model file {model[0]!r} (from {model[1]}) does not exist; "
                    "give the path of a GGUF file (transformers: a model folder or config JSON)"
                )
        try:
            self.dataset, self.dataset_missing = workloads.profile_dataset(
                self.profile.name,
                self.profile.dataset,
                self.profile.defined_in,
                settings.setting(config, "tokperf_dataset"),
            )
        except workloads.WorkloadError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.server_settings = {
            key: value
            for key, name in (
                ("base_url", "tokperf_base_url"),
                ("model", "tokperf_served_model"),
                ("tokenizer", "tokperf_tokenizer"),
            )
            if (value := (settings.setting(config, name) or ("", ""))[0])
        }
        if self.backend == "openai" and precision_setting is not None:
            self.server_settings["precision"] = precision_setting[0]  # a label: served as is
        server_cmd = settings.setting(config, "tokperf_server_cmd")
        self.server_cmd = server_cmd[0] if server_cmd else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server: launcher.Server | None = None
        self.reference_servers: list[launcher.Server] = []
        self.client_procs = settings.client_procs(config)  # 0: auto
        self.spawn: procs.Spawn | None = None  # how a client process loads the engine
        self.inconclusive = settings.inconclusive_policy(config)
        self.confidence = settings.confidence(config)
        # xdist's documented marker of a worker process
        self.is_worker = hasattr(config, "workerinput")
        self.references: dict[str, Engine] = {}  # reference engines by precision, lazily
        # xdist workers inherit the launcher's MPI environment but are no MPI ranks
        connect = rack.connect if not self.is_worker else lambda *_: rack.Local()
        self.rack = connect(
            settings.seconds(config, "tokperf_rack_timeout", rack.DEFAULT_TIMEOUT_S, zero=False),
            {"profile": self.profile.name, "backend": self.backend,
             "model": self.profile.model, "precision": self.profile.precision},
            tuple((g.fabric_cluster, g.fabric_clique, g.fabric_state)
                  for g in self.inventory.gpus),
        )  # fmt: skip
        if isinstance(self.rack, rack.Rack):
            config.pluginmanager.register(self.rack, "tokperf-rack")
        records_setting = settings.setting(config, "tokperf_records")
        self.records = None
        if records_setting is not None:
            rank = self.rack.rank if self.rack.size > 1 else None
            self.records = records.Writer(Path(records_setting[0]), self.rack.node, rank)
        html = settings.setting(config, "tokperf_html")
        self.html_path = Path(html[0]) if html else None
        save = settings.setting(config, "tokperf_save_baseline")
        compare = settings.setting(config, "tokperf_baseline")
        self.gate = baseline.Baselines(
            save_dir=Path(save[0]) if save else None,
            compare_dir=Path(compare[0]) if compare else None,
            tolerance=settings.fraction(config, "tokperf_max_regression"),
            confidence=self.confidence,
            rootdir=config.rootpath,
            inventory=self.inventory,
            entries=acknowledged.load(config.rootpath),
            want_latencies=self.html_path is not None or bool(config.getoption("htmlpath", None)),
        )
        self.results = results.Results(
            config,
            self.profile,
            self.profile_source,
            self.inventory,
            self.rack,
            self.records,
            self.json_path,
            self.html_path,
        )

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
        if self.backend == "transformers":
            if self.model_path is not None:
                settings["model"] = str(self.model_path)
            if at is not None:
                settings["dtype"] = at
        return settings

    def reference_engine(self, at: str) -> Engine:
        """The reference engine at precision `at` (see reference.py), loaded once."""
        if at in self.references:
            return self.references[at]
        fds = self.allocation.fds if self.allocation else ()
        try:
            plan = reference.plan(
                self.backend,
                self.engine_settings(at),
                self.profile,
                at,
                lambda name: (settings.setting(self.config, name) or (None, ""))[0],
                self.server.base_url if self.server else self.server_settings.get("base_url"),
            )
            if plan.server_cmd is not None:
                server = launcher.start(plan.server_cmd, pass_fds=fds)
                self.reference_servers.append(server)
                plan.settings["base_url"] = server.base_url
            devices = self.allocation.devices if self.allocation else self.profile.devices
            engine = load_engine(self.backend, plan.settings, devices)
        except reference.Missing as exc:
            why = f"no reference for accuracy parity: {exc}"
        except (EngineError, launcher.LaunchError) as exc:
            why = f"tokperf could not load its {at} reference engine: {exc}"
        else:
            self.references[at] = engine
            return engine
        pytest.fail(why, pytrace=False)  # outside the except: no chained traceback

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        if self.unmatched is not None:
            return [
                "tokperf: no profile matches these GPUs (tests that use tokperf stop)",
                f"tokperf: GPUs: {self.inventory.describe()}",
            ]
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
        if self.unmatched is not None:
            pytest.fail(self.unmatched, pytrace=False)
        if self.profile.device_kind != "gpu":
            return gpus.Allocation()
        need = self.profile.need(self.gpu_count)
        try:
            return gpus.allocate(
                self.inventory, need, self.lock_dir, self.allow_busy, wait_s=self.gpu_wait
            )
        except gpus.Shortage as exc:
            if self.require_hardware:
                pytest.fail(f"{exc} (--tokperf-require-hardware)", pytrace=False)
            pytest.skip(str(exc))

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # (an xdist worker's usage error would be an internal error: its tests fail instead)
        tokperf_used = any(_uses_tokperf(item) for item in items)
        if self.unmatched is not None and tokperf_used and not self.is_worker:
            raise pytest.UsageError(self.unmatched)
        # validate every marker before anything runs: a typo is a usage error, not a skip
        for item in items:
            marker = item.get_closest_marker("throughput_floor")
            if marker is not None:
                item.stash[BOUNDS] = markers.parse_floor_marker(
                    marker.args, marker.kwargs, item.nodeid, self.registry
                )
            parity = item.get_closest_marker("accuracy_parity")
            if parity is not None:
                item.stash[PARITY] = markers.parse_parity_marker(
                    parity.args,
                    parity.kwargs,
                    item.nodeid,
                    self.precisions(),
                    reference.defaults(self.profile),
                )
            marker = item.get_closest_marker("latency_slo")
            if marker is not None:
                item.stash[SLO_BOUNDS] = markers.parse_slo_marker(
                    marker.args, marker.kwargs, item.nodeid, self.registry
                )
            marker = item.get_closest_marker("no_regression")
            if marker is not None:
                item.stash[NO_REGRESSION] = markers.parse_no_regression_marker(
                    marker.args, marker.kwargs, item.nodeid
                )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        runner = item.stash.get(RUNNER, None)
        floors = item.stash.get(FLOORS, None)
        slos = item.stash.get(SLOS, None)
        gated = floors is not None or slos is not None
        interrupted = None
        cut = False  # Ctrl-C came in a run (its requests in flight were cut)
        try:
            yield  # the test body; if it raised, that is the outcome and nothing below runs
        except KeyboardInterrupt as exc:  # Ctrl-C: keep what finished, then stop
            cut = isinstance(exc, driver.Interrupted)
            runner = item.stash.get(RUNNER, None)
            if not cut and (runner is None or runner.last is None):
                raise  # nothing measured to keep: pytest's own interrupt
            interrupted = str(exc) if cut else f"{driver.INTERRUPTED} in the test's own code"
            item.session.shouldstop = f"tokperf: {interrupted}"  # pytest exits with status 2
        except BaseException as exc:
            if gated:  # other ranks may be waiting for this one
                skipped = isinstance(exc, pytest.skip.Exception)
                status = f"skipped: {exc}" if skipped else f"failed: {type(exc).__name__}: {exc}"
                common = self.rack.abandon(status, bool(runner and runner.last))
                if common is not None:  # every rank reports the rack's one outcome
                    kind, why = common
                    if kind == "skip":
                        pytest.skip(why)
                    pytest.fail(why, pytrace=False)
            raise
        if interrupted is not None and (runner is None or runner.last is None):
            pytest.fail(f"{interrupted}: nothing was measured; the session stops", pytrace=False)
        if runner is None:
            return
        if interrupted is None and PARITY in item.stash:
            self._judge_parity(item, runner)
        elif runner.last_parity is not None:  # tokperf.accuracy() without the marker
            data = report.parity_payload(item.nodeid, runner.last_parity, self.profile)
            data["verdict"] = "MEASURED"  # reported, not gated
            item.user_properties.append((report.PROPERTY, json.dumps(data)))
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
        if interrupted is not None:  # a cut run is no measurement, whatever it shows
            done = result.requests - result.failed
            when = f"{result.duration_s:.1f} s" if cut else "its last run"
            why = (
                f"{interrupted} after {when}, {done:,} of "
                f"{result.requests:,} requests finished; the session stops"
            )
            invalid = (why, *outcome.invalid)
            outcome = dataclasses.replace(outcome, status="INVALID", invalid=invalid)
            gated = True
        good = result.goodput(verdict.per_request_limits(slos)) if slos else None
        data = report.payload(
            item.nodeid, result, outcome, floors or {}, self.profile, slos, good, gpus=runner.gpus
        )
        if not gated:
            data["verdict"] = "MEASURED"  # no floor and no SLO: reported, not gated
        # baselines: save, or compare (a compared test is gated by its regression checks)
        data = self.gate.apply(data, result, runner.gpus, item.stash.get(NO_REGRESSION, None))
        gated = gated or bool(data.get("regression", {}).get("compared"))
        if not gated:
            item.user_properties.append((report.PROPERTY, json.dumps(data)))
            return
        # the rack's floor: the marker's per_rack, else for a bare throughput_floor() the
        # profile's rack_floor (nodes > 1); kept in the node's payload for `merge`
        rack_floor = item.stash.get(RACK_FLOOR, None)
        bare = item.stash.get(BOUNDS, None) == {}
        default_rack = rack_floor is None and bare and self.profile.nodes > 1
        data["rack_floor"] = self.profile.rack_floor if default_rack else rack_floor
        data["rack_nodes"] = self.profile.nodes if default_rack else None
        data, rows = self.rack.settle(
            item.nodeid,
            data,
            rackjudge.timeline(result.records, runner.anchors[-1], result.window_end_ns),
            floor=data["rack_floor"],
            confidence=self.confidence,
            expected_nodes=data["rack_nodes"],
        )
        for row in rows:
            item.user_properties.append((report.PROPERTY, json.dumps(row)))
        status = data["verdict"]
        if data.get("kind") == "rack":
            message = rackjudge.message(data)
        else:
            lines = [report.failure_message(data), *summary.regression_lines(data)]
            message = "\n".join(line for line in lines if line)
        if status in ("FAIL", "INVALID"):
            pytest.fail(message, pytrace=False)
        if status == "INCONCLUSIVE":
            if self.inconclusive == "fail":
                pytest.fail(message, pytrace=False)
            if self.inconclusive == "skip":
                pytest.skip(message)

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
        ):
            outcome, why = self.rack.skipped_in_setup(str(skip.msg))
            if all(name != PROPERTY for name, _ in rep.user_properties):
                data = report.skipped(item.nodeid, self.profile, why)
                rep.user_properties.append((PROPERTY, json.dumps(data)))
            if outcome == "fail":  # the rack fails this test on every rank alike
                rep.outcome, rep.longrepr = "failed", why
            elif isinstance(rep.longrepr, tuple):
                rep.longrepr = (rep.longrepr[0], rep.longrepr[1], f"Skipped: {why}")
        if rep.when == "call" and self.config.getoption("htmlpath", None):  # pytest-html
            from pytest_tokperf import html

            payloads = [json.loads(str(v)) for k, v in rep.user_properties if k == PROPERTY]
            html.add_pytest_html_extra(rep, payloads)
        if rep.failed and self.server is not None:
            # a failing perf test against a launched server gets that server's log
            rep.sections.append(("tokperf server log (tail)", self.server.log_tail()))
        return rep

    def pytest_sessionfinish(self) -> None:
        for engine in self.references.values():
            self.loop.run_until_complete(engine.aclose())
        self.references.clear()
        for server in (self.server, *self.reference_servers):
            if server is not None:
                server.stop()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()


def pytest_configure(config: pytest.Config) -> None:
    for line in markers.HELP:
        config.addinivalue_line("markers", line)
    if config.getoption("help"):  # --help resolves no setting: a bad one must not break it
        return
    session = TokperfSession(config)
    config.pluginmanager.register(session, "tokperf-session")
    config.pluginmanager.register(session.results, "tokperf-results")


MARKERS = ("throughput_floor", "accuracy_parity", "latency_slo")
FIXTURES = ("tokperf", "tokperf_engine", "tokperf_gpus", "tokperf_reference_engine")


def _uses_tokperf(item: pytest.Item) -> bool:
    if any(item.get_closest_marker(name) for name in MARKERS):
        return True
    return any(name in FIXTURES for name in getattr(item, "fixturenames", ()))


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
    state = _session(pytestconfig)
    allocation = state.allocate()
    state.allocation = allocation  # a launched server inherits its locks
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
            state.server = launcher.start(
                state.server_cmd, settings.get("base_url"), pass_fds=tokperf_gpus.fds
            )
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
    runner.parity_spec = request.node.stash.get(PARITY, reference.defaults(state.profile))
    runner.confidence = state.confidence
    runner.dataset = state.dataset
    if state.dataset_missing is not None:
        runner.dataset_missing = lambda: _no_dataset(request.node, state)
    runner.floors = request.node.stash.get(FLOORS, {})
    runner.progress = state.progress()
    runner.before_run = state.rack.start
    if state.records is not None:
        write = state.records.write
        runner.after_run = lambda result, anchor: write(
            result.records, anchor, request.node.nodeid, len(runner.results) - 1,
            result.window_end_ns,
        )  # fmt: skip
    request.node.stash[RUNNER] = runner
    return runner


def _no_dataset(item: pytest.Item, state: TokperfSession) -> None:
    """A run of the profile's default workload without its dataset: skip, or fail with
    --tokperf-require-hardware; never the built-in prompts against its floors."""
    reason = str(state.dataset_missing)
    data = report.skipped(item.nodeid, state.profile, reason)
    item.user_properties.append((PROPERTY, json.dumps(data)))
    if state.require_hardware:
        pytest.fail(f"{reason} (--tokperf-require-hardware)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _tokperf_parity(request: pytest.FixtureRequest) -> None:
    """Tests marked accuracy_parity get the runner even when they do not ask for it, and
    their reference engine: a missing reference errors before anything runs."""
    if PARITY in request.node.stash:
        request.getfixturevalue("tokperf")
        state = _session(request.config)
        at = request.node.stash[PARITY].reference or state.profile.reference_precision
        if at is not None:
            state.reference_engine(at)


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
    if floors == {}:
        pytest.fail(
            f"throughput_floor() sets no floor, and profile {profile.name!r} has no default "
            "floor: give min_tokens_per_s=... or per_gpu=... in the marker, or floors in "
            "your profile",
            pytrace=False,
        )
    if isinstance(floors, dict) and "per_rack" in floors:
        request.node.stash[RACK_FLOOR] = floors.pop("per_rack")
        if _session(request.config).rack.size == 1:
            reason = (
                "throughput_floor(per_rack=...) needs every node of the rack: launch one "
                "pytest per node under MPI (srun/mpiexec, extra [rack])"
            )
            data = report.skipped(request.node.nodeid, profile, reason)
            request.node.user_properties.append((PROPERTY, json.dumps(data)))
            pytest.skip(reason)
    if isinstance(floors, dict):
        request.node.stash[FLOORS] = floors
    if isinstance(slos, dict):
        request.node.stash[SLOS] = slos
    runner = request.getfixturevalue("tokperf")
    runner.floors = floors or {}
