"""The gate: a test's markers and its last tokperf result (and its baseline) become a
payload and a pass, fail or skip.

Markers are validated into the item's stash before anything runs; after the test body
the gate judges the runner's last result (`verdict`), compares it with its baseline
(`baseline.Baselines`), settles it with the other MPI ranks (`rack`) and records the
payload in `user_properties`, where `results` collects it. Registered as the plugin
"tokperf-gate".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Generator, Iterator

import pytest

from pytest_tokperf import (
    accuracy,
    acknowledged,
    baseline,
    driver,
    markers,
    rack,
    rackjudge,
    reference,
    report,
    summary,
    verdict,
)
from pytest_tokperf.gpus import Inventory
from pytest_tokperf.runner import Tokperf
from pytest_tokperf.settings import Settings

BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
FLOORS = pytest.StashKey[dict[str, float]]()
SLO_BOUNDS = pytest.StashKey[dict[str, verdict.Bound]]()
SLOS = pytest.StashKey[dict[str, float]]()
RACK_FLOOR = pytest.StashKey[float]()
RUNNER = pytest.StashKey[Tokperf]()
PARITY = pytest.StashKey[accuracy.ParitySpec]()
NO_REGRESSION = pytest.StashKey[dict[str, float | None]]()
PROPERTY = report.PROPERTY

MARKERS = ("throughput_floor", "accuracy_parity", "latency_slo")
FIXTURES = ("tokperf", "tokperf_engine", "tokperf_gpus", "tokperf_reference_engine")


def _uses_tokperf(item: pytest.Item) -> bool:
    if any(item.get_closest_marker(name) for name in MARKERS):
        return True
    return any(name in FIXTURES for name in getattr(item, "fixturenames", ()))


class Gate:
    """Judges the tests of one process; needs no engine, only settings and the world."""

    def __init__(
        self,
        config: pytest.Config,
        s: Settings,
        world: rack.Local | rack.Rack,
        inventory: Inventory,
    ) -> None:
        self.config = config
        self.settings = s
        self.world = world
        # xdist's documented marker of a worker process
        self.is_worker = hasattr(config, "workerinput")
        self.baselines = baseline.Baselines(
            save_dir=s.save_baseline,
            compare_dir=s.compare_baseline,
            tolerance=s.max_regression,
            confidence=s.confidence,
            rootdir=config.rootpath,
            inventory=inventory,
            entries=acknowledged.load(config.rootpath),
            want_latencies=s.html_path is not None or bool(config.getoption("htmlpath", None)),
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        s = self.settings
        # (an xdist worker's usage error would be an internal error: its tests fail instead)
        tokperf_used = any(_uses_tokperf(item) for item in items)
        if s.unmatched is not None and tokperf_used and not self.is_worker:
            raise pytest.UsageError(s.unmatched)
        # validate every marker before anything runs: a typo is a usage error, not a skip
        for item in items:
            marker = item.get_closest_marker("throughput_floor")
            if marker is not None:
                item.stash[BOUNDS] = markers.parse_floor_marker(
                    marker.args, marker.kwargs, item.nodeid, s.registry
                )
            parity = item.get_closest_marker("accuracy_parity")
            if parity is not None:
                item.stash[PARITY] = markers.parse_parity_marker(
                    parity.args,
                    parity.kwargs,
                    item.nodeid,
                    s.precisions,
                    reference.defaults(s.profile),
                )
            marker = item.get_closest_marker("latency_slo")
            if marker is not None:
                item.stash[SLO_BOUNDS] = markers.parse_slo_marker(
                    marker.args, marker.kwargs, item.nodeid, s.registry
                )
            marker = item.get_closest_marker("no_regression")
            if marker is not None:
                item.stash[NO_REGRESSION] = markers.parse_no_regression_marker(
                    marker.args, marker.kwargs, item.nodeid
                )

    def floors(self, item: pytest.Item) -> dict[str, float] | None:
        """A test marked throughput_floor or latency_slo: its floors under this profile
        (its SLOs go to the stash), or a skip without a bound for this profile.

        None: the test has neither marker.
        """
        bounds = item.stash.get(BOUNDS, None)
        slo_bounds = item.stash.get(SLO_BOUNDS, None)
        if bounds is None and slo_bounds is None:
            return None
        profile = self.settings.profile
        floors = (
            None if bounds is None else verdict.floors_for(bounds, profile.name, profile.floors)
        )
        # a bare latency_slo() resolves to {} here and to the scenario's defaults after the run
        slos = (
            None
            if slo_bounds is None
            else verdict.floors_for(slo_bounds, profile.name, {}, marker="latency_slo")
        )
        for reason in (floors, slos):
            if isinstance(reason, str):
                self._skipped_row(item, reason)
                pytest.skip(reason)
        if floors == {}:
            pytest.fail(
                f"throughput_floor() sets no floor, and profile {profile.name!r} has no default "
                "floor: give min_tokens_per_s=... or per_gpu=... in the marker, or floors in "
                "your profile",
                pytrace=False,
            )
        if isinstance(floors, dict) and "per_rack" in floors:
            item.stash[RACK_FLOOR] = floors.pop("per_rack")
            if self.world.size == 1:
                reason = (
                    "throughput_floor(per_rack=...) needs every node of the rack: launch one "
                    "pytest per node under MPI (srun/mpiexec, extra [rack])"
                )
                self._skipped_row(item, reason)
                pytest.skip(reason)
        if isinstance(floors, dict):
            item.stash[FLOORS] = floors
        if isinstance(slos, dict):
            item.stash[SLOS] = slos
        return floors if isinstance(floors, dict) else {}

    def no_dataset(self, item: pytest.Item) -> None:
        """A run of the profile's default workload without its dataset: skip, or fail with
        --tokperf-require-hardware; never the built-in prompts against its floors."""
        reason = str(self.settings.dataset_missing)
        self._skipped_row(item, reason)
        if self.settings.require_hardware:
            pytest.fail(f"{reason} (--tokperf-require-hardware)", pytrace=False)
        pytest.skip(reason)

    def _skipped_row(self, item: pytest.Item, reason: str) -> None:
        """The results row of a gated test that does not run here, and why."""
        data = report.skipped(item.nodeid, self.settings.profile, reason)
        item.user_properties.append((PROPERTY, json.dumps(data)))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        s = self.settings
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
                common = self.world.abandon(status, bool(runner and runner.last))
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
            data = report.parity_payload(item.nodeid, runner.last_parity, s.profile)
            data["verdict"] = "MEASURED"  # reported, not gated
            item.user_properties.append((PROPERTY, json.dumps(data)))
        if gated and runner.last is None:
            runner.run()  # the marked test never ran a workload: run the profile's default
        result = runner.last
        if result is None:
            return
        if slos == {}:  # a bare latency_slo(): the profile's limits for this scenario
            slos = dict(s.profile.slos.get(result.scenario, {}))
            if not slos:
                pytest.fail(
                    f"latency_slo() without limits: profile {s.profile.name!r} has no "
                    f"default SLOs for the {result.scenario} scenario; give limits such as "
                    "ttft_p99_ms=...",
                    pytrace=False,
                )
        outcome = verdict.judge(
            result, floors or {}, slos, confidence=s.confidence, looks=runner.looks[-1]
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
            item.nodeid, result, outcome, floors or {}, s.profile, slos, good, gpus=runner.gpus
        )
        if not gated:
            data["verdict"] = "MEASURED"  # no floor and no SLO: reported, not gated
        # baselines: save, or compare (a compared test is gated by its regression checks)
        data = self.baselines.apply(data, result, runner.gpus, item.stash.get(NO_REGRESSION, None))
        gated = gated or bool(data.get("regression", {}).get("compared"))
        if not gated:
            item.user_properties.append((PROPERTY, json.dumps(data)))
            return
        # the rack's floor: the marker's per_rack, else for a bare throughput_floor() the
        # profile's rack_floor (nodes > 1); kept in the node's payload for `merge`
        rack_floor = item.stash.get(RACK_FLOOR, None)
        bare = item.stash.get(BOUNDS, None) == {}
        default_rack = rack_floor is None and bare and s.profile.nodes > 1
        data["rack_floor"] = s.profile.rack_floor if default_rack else rack_floor
        data["rack_nodes"] = s.profile.nodes if default_rack else None
        data, rows = self.world.settle(
            item.nodeid,
            data,
            rackjudge.timeline(result.records, runner.anchors[-1], result.window_end_ns),
            floor=data["rack_floor"],
            confidence=s.confidence,
            expected_nodes=data["rack_nodes"],
        )
        for row in rows:
            item.user_properties.append((PROPERTY, json.dumps(row)))
        status = data["verdict"]
        if data.get("kind") == "rack":
            message = rackjudge.message(data)
        else:
            lines = [report.failure_message(data), *summary.regression_lines(data)]
            message = "\n".join(line for line in lines if line)
        if status in ("FAIL", "INVALID"):
            pytest.fail(message, pytrace=False)
        if status == "INCONCLUSIVE":
            if s.inconclusive == "fail":
                pytest.fail(message, pytrace=False)
            if s.inconclusive == "skip":
                pytest.skip(message)

    def _judge_parity(self, item: pytest.Item, runner: Tokperf) -> None:
        """A marked parity test: its last accuracy result (run one if it ran none)."""
        if runner.last_parity is None:
            try:
                runner.accuracy()
            except accuracy.ParityError as exc:
                pytest.fail(f"accuracy parity could not be scored: {exc}", pytrace=False)
        result = runner.last_parity
        assert result is not None
        data = report.parity_payload(item.nodeid, result, self.settings.profile)
        item.user_properties.append((PROPERTY, json.dumps(data)))
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
            outcome, why = self.world.skipped_in_setup(str(skip.msg))
            if all(name != PROPERTY for name, _ in rep.user_properties):
                data = report.skipped(item.nodeid, self.settings.profile, why)
                rep.user_properties.append((PROPERTY, json.dumps(data)))
            if outcome == "fail":  # the rack fails this test on every rank alike
                rep.outcome, rep.longrepr = "failed", why
            elif isinstance(rep.longrepr, tuple):
                rep.longrepr = (rep.longrepr[0], rep.longrepr[1], f"Skipped: {why}")
        if rep.when == "call" and self.config.getoption("htmlpath", None):  # pytest-html
            from pytest_tokperf import html

            payloads = [json.loads(str(v)) for k, v in rep.user_properties if k == PROPERTY]
            html.add_pytest_html_extra(rep, payloads)
        return rep
