"""The gate: every check of a test (its runs, its markers, its baseline, its rack)
judged once, into one payload and a pass, fail or skip.

Markers are read with `iter_markers` whenever they are needed (validated at
collection, applied at setup for skips and early stopping, read again when the test
is judged), so markers a conftest hook or a fixture adds count. After the test body
the gate collects the checks (`verdict`: failed requests of every run, floors, SLOs,
validity; `baseline`: the comparison or the missing baseline; parity), decides them
with `verdict.decide`, builds the payload from that one verdict, saves the baseline
only from a clean verdict, settles the rack with the other MPI ranks (`rack`) and
records the payload in `user_properties`, where `results` collects it. Registered as
the plugin "tokperf-gate".
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Generator, Iterator, Mapping
from typing import Any

import pytest

from pytest_tokperf import (
    accuracy,
    acknowledged,
    baseline,
    capacity,
    driver,
    goodput,
    markers,
    rack,
    rackjudge,
    reference,
    report,
    sequential,
    summary,
    sweep,
    verdict,
)
from pytest_tokperf.hardware.inventory import Inventory
from pytest_tokperf.markers import Spec
from pytest_tokperf.runner import Tokperf
from pytest_tokperf.settings import Settings

RUNNER = pytest.StashKey[Tokperf]()
PROPERTY = report.PROPERTY

FIXTURES = ("tokperf", "tokperf_engine", "tokperf_gpus", "tokperf_reference_engine")


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

    # --- the markers ------------------------------------------------------------------

    def spec(self, item: pytest.Item, *, running: bool = True) -> Spec:
        """All of the test's tokperf markers now, combined; a bad one added at run time
        fails the test (at collection it is a usage error)."""
        s = self.settings
        marks = {
            name: [(node.nodeid, mark) for node, mark in item.iter_markers_with_node(name)]
            for name in markers.NAMES
        }
        try:
            return markers.read(
                marks, s.profile, s.registry, s.precisions, reference.defaults(s.profile)
            )
        except pytest.UsageError as exc:
            if running:
                pytest.fail(str(exc), pytrace=False)
            raise

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        s = self.settings
        # (an xdist worker's usage error would be an internal error: its tests fail instead)
        used = any(
            any(item.get_closest_marker(name) for name in markers.NAMES[:3])
            or any(name in FIXTURES for name in getattr(item, "fixturenames", ()))
            for item in items
        )
        if s.unmatched is not None and used and not self.is_worker:
            raise pytest.UsageError(s.unmatched)
        for item in items:  # every marker validated before anything runs: a typo stops here
            self.spec(item, running=False)

    def _applies(self, item: pytest.Item, spec: Spec) -> None:
        """Skip (or fail) a gated test that cannot be judged here, saying why."""
        s = self.settings
        if spec.skip is not None:
            self._skipped_row(item, spec.skip)
            pytest.skip(spec.skip)
        if spec.bare_floor and not spec.floors and spec.rack_floor is None:
            pytest.fail(
                f"throughput_floor() sets no floor, and profile {s.profile.name!r} has no "
                "default floor: give min_tokens_per_s=... or per_gpu=... in the marker, or "
                "floors in your profile",
                pytrace=False,
            )
        if spec.rack_floor is not None and self.world.size == 1:
            if not spec.bare_floor or s.profile.nodes < 2:  # the marker's own per_rack
                reason = (
                    "throughput_floor(per_rack=...) needs every node of the rack: launch one "
                    "pytest per node under MPI (srun/mpiexec, extra [rack]); this run has 1 node"
                )
            else:
                reason = (
                    f"profile {s.profile.name}'s default floor includes its rack floor "
                    f"({report.num(spec.rack_floor)} output tokens/s) for {s.profile.nodes} "
                    "nodes; this run has 1: launch one pytest per node under MPI "
                    "(srun/mpiexec, extra [rack]), or give per_gpu=... in the marker to "
                    "gate one node"
                )
            self._skipped_row(item, reason)
            if s.require_hardware:
                pytest.fail(f"{reason} (--tokperf-require-hardware)", pytrace=False)
            pytest.skip(reason)

    def floors(self, item: pytest.Item) -> dict[str, float] | None:
        """At setup: a gated test's floors under this profile (for early stopping), or a
        skip when it cannot be judged here. None: no floor or SLO marker yet."""
        spec = self.spec(item)
        if not spec.gated and spec.skip is None:
            return None
        self._applies(item, spec)
        return dict(spec.floors or {})

    def capacity(self, item: pytest.Item) -> dict[str, float] | None:
        return self.spec(item).capacity

    def parity(self, item: pytest.Item) -> accuracy.ParitySpec | None:
        return self.spec(item).parity

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

    # --- the test body, then its judgment ------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        runner = item.stash.get(RUNNER, None)
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
            if self.spec(item).gated:  # other ranks may be waiting for this one
                skipped = isinstance(exc, pytest.skip.Exception)
                status = f"skipped: {exc}" if skipped else f"failed: {type(exc).__name__}: {exc}"
                common = self.world.abandon(status, bool(runner and runner.last))
                if common is not None:  # every rank reports the rack's one outcome
                    kind, why = common
                    if kind == "skip":
                        pytest.skip(why)
                    pytest.fail(why, pytrace=False)
            raise
        runner = item.stash.get(RUNNER, None)
        spec = self.spec(item)  # again: markers added during setup or the body count
        if spec.gated or spec.skip is not None:
            self._applies(item, spec)
        if runner is None:
            if spec.gated or spec.parity is not None or spec.capacity is not None:
                pytest.fail(
                    f"{item.nodeid} is marked {', '.join(spec.places)} but does not use the "
                    "tokperf fixture, so nothing was measured: a marker added after setup "
                    "needs the test to ask for `tokperf`",
                    pytrace=False,
                )
            return
        if interrupted is not None and runner.last is None and not runner.parity_results:
            pytest.fail(f"{interrupted}: nothing was measured; the session stops", pytrace=False)
        if interrupted is None and spec.parity is not None and runner.last_parity is None:
            runner.parity_spec = spec.parity
            try:
                runner.accuracy()
            except (ValueError, accuracy.ParityError) as exc:
                pytest.fail(f"accuracy parity could not be scored: {exc}", pytrace=False)
        if interrupted is None and spec.capacity is not None and not runner.capacities:
            runner.capacity_floor = spec.capacity  # searched with the marker's floor and SLOs
            try:
                runner.capacity()
            except ValueError as exc:
                pytest.fail(f"capacity_floor: the capacity search could not run: {exc}",
                            pytrace=False)  # fmt: skip
        if interrupted is None and spec.gated and runner.last is None and not runner.capacities:
            runner.run()  # the marked test never ran a workload: run the profile's default
        if runner.last is None and not runner.parity_results and not runner.capacities:
            return
        data, message = self._judge(item, runner, spec, interrupted, cut)
        status = data["verdict"]
        if status in ("FAIL", "INVALID"):
            pytest.fail(message, pytrace=False)
        if status == "INCONCLUSIVE":
            if self.settings.inconclusive == "fail":
                pytest.fail(message, pytrace=False)
            if self.settings.inconclusive == "skip":
                pytest.skip(message)

    def _judge(
        self,
        item: pytest.Item,
        runner: Tokperf,
        spec: Spec,
        interrupted: str | None,
        cut: bool,
    ) -> tuple[dict[str, Any], str]:
        """The one judgment of a test: (its deciding payload, the message if it failed).

        Every payload row is recorded here, built after `verdict.decide` from its checks.
        """
        s = self.settings
        if runner.capacities and (spec.capacity is not None or runner.last is None):
            return self._judge_capacity(item, runner, spec, interrupted)
        parity = [] if spec.parity is None else runner.parity_results
        checks = [
            c for i, p in enumerate(parity) for c in verdict.parity_checks(p, i)
        ]  # fmt: skip
        result = runner.last
        if result is None:  # accuracy parity alone
            assert runner.last_parity is not None
            outcome = verdict.verdict_of(checks)
            data = report.judged(
                report.parity_measurement(item.nodeid, runner.last_parity, s.profile), outcome
            )
            if spec.parity is None:  # tokperf.accuracy() without the marker: reported
                assert data["verdict"] == "MEASURED"
            item.user_properties.append((PROPERTY, json.dumps(data)))
            return data, report.parity_message(data)
        slos = self._slos(spec, result.scenario)
        n = len(runner.results)
        checks += [verdict.failure_check(r, i, n) for i, r in enumerate(runner.results[:-1])]
        last = verdict.judge(
            result,
            spec.floors or {},
            slos,
            confidence=s.confidence,
            looks=runner.looks[-1],
            busy=s.busy_machine,
            throttled=s.profile.throttled,
        )
        first, *rest = last.checks  # the last run's failed requests, numbered in the test
        checks += [dataclasses.replace(first, run=n - 1, runs=n), *rest]
        if spec.goodput_floor is not None:
            each = verdict.per_look(s.confidence, runner.looks[-1])
            checks.append(goodput.floor_check(result, spec.goodput_floor, slos or {}, each))
        if interrupted is not None:  # a cut run is no measurement, whatever it shows
            done = result.requests - result.failed
            when = f"{result.duration_s:.1f} s" if cut else "its last run"
            why = (
                f"{interrupted} after {when}, {done:,} of "
                f"{result.requests:,} requests finished; the session stops"
            )
            checks.insert(0, verdict.check("interrupted", "INVALID", "interrupted", why))
        good = result.goodput(verdict.per_request_limits(slos)) if slos else None
        data = report.measurement(
            item.nodeid, result, spec.floors or {}, s.profile, slos, good,
            gpus=runner.gpus, runs=runner.results,
        )  # fmt: skip
        sweep.attach(data, runner)
        data.update(self.baselines.extras(data, result, runner.gpus))
        # the fingerprint a history or baseline is keyed by, in every results file
        hw = baseline.hardware(data["device_kind"], self.baselines.inventory, runner.gpus)
        data.setdefault("hardware", hw)
        block = None
        if self.baselines.compare_dir is not None:
            block = self.baselines.compare(data, spec.no_regression)
            checks += baseline.checks(block, s.baseline_missing)
        outcome = verdict.verdict_of(checks, s.confidence, runner.looks[-1])
        parity_block = (
            None
            if runner.last_parity is None
            else report.parity_measurement(item.nodeid, runner.last_parity, s.profile)
        )
        data = report.judged(data, outcome, regression=block, parity=parity_block)
        data["rack_floor"], data["rack_nodes"] = spec.rack_floor, spec.rack_nodes
        clean = not any(c.status in ("FAIL", "INVALID") for c in outcome.checks)
        if self.baselines.save_dir is not None and clean:
            data["baseline_saved"] = self.baselines.save(data)
        if not (spec.gated or block is not None):
            item.user_properties.append((PROPERTY, json.dumps(data)))
            return data, self._message(data)
        data, rows = self.world.settle(
            item.nodeid,
            data,
            rackjudge.timeline(result.records, runner.anchors[-1], result.window_end_ns),
            floor=spec.rack_floor,
            confidence=s.confidence,
            expected_nodes=spec.rack_nodes,
        )
        for row in rows:
            item.user_properties.append((PROPERTY, json.dumps(row)))
        return data, self._message(data)

    def _judge_capacity(
        self, item: pytest.Item, runner: Tokperf, spec: Spec, interrupted: str | None
    ) -> tuple[dict[str, Any], str]:
        """A capacity test's one judgment: its last search against its capacity_floor
        (`capacity.floor_check`); without the marker the search is MEASURED. The run
        shown is the probe at the floor, else the highest that passed, else the last."""
        s = self.settings
        found = runner.capacities[-1]
        wanted = dict(spec.capacity or {})
        least = wanted.pop("min_qps", None)
        least = wanted.pop("min_concurrency", least)
        wanted.pop("budget_s", None)
        checks = []
        if interrupted is not None:
            why = f"{interrupted} during the capacity search; the session stops"
            checks.append(verdict.check("interrupted", "INVALID", "interrupted", why))
        if least is not None:
            checks.append(capacity.floor_check(found, least))
            if wanted != found.slos:
                why = (
                    f"the capacity search judged SLOs {found.slos} but capacity_floor asks "
                    f"{wanted}: call tokperf.capacity() without slos=, or with the marker's"
                )
                checks.append(verdict.check("capacity_slos", "INVALID", "validity", why))
        probes = found.probes
        passed = [p for p in probes if p.status == "PASS"]
        shown = next(
            (p for p in probes if least is not None and math.isclose(p.level, least)),
            max(passed, key=lambda p: p.level) if passed else probes[-1],
        )
        result = shown.result
        data = report.measurement(
            item.nodeid, result, {}, s.profile, found.slos,
            result.goodput(verdict.per_request_limits(found.slos)),
            gpus=runner.gpus, runs=[p.result for p in probes],
        )  # fmt: skip
        sweep.attach(data, runner)
        data["capacity"] = found.to_json()
        data["capacity_floor"] = spec.capacity
        data = report.judged(data, verdict.verdict_of(checks, s.confidence))
        item.user_properties.append((PROPERTY, json.dumps(data)))
        return data, self._message(data)

    def _slos(self, spec: Spec, scenario: str) -> dict[str, float] | None:
        """The test's SLO limits for the run's scenario; a bare latency_slo() on a
        profile with no defaults for it fails the test, saying what to give."""
        slos = spec.slos_for(self.settings.profile, scenario)
        if slos == {} and spec.slo_defaults:
            profile = self.settings.profile
            pytest.fail(
                f"latency_slo() without limits: profile {profile.name!r} has no default "
                f"SLOs for the {scenario} scenario; give limits such as ttft_p99_ms=...",
                pytrace=False,
            )
        return slos

    def early_stopping(self, item: pytest.Item, runner: Tokperf, uuids: tuple[str, ...]) -> None:
        """What the runner's early stopping decides besides the floors: the SLOs for
        each run's scenario and, when comparing, the test's stored baseline."""
        s = self.settings

        def slos(scenario: str) -> dict[str, float]:
            return self.spec(item).slos_for(s.profile, scenario) or {}

        def stored(run: Mapping[str, Any]) -> sequential.Baseline | None:
            mine = {**run, "nodeid": item.nodeid, "profile": s.profile.name,
                    "device_kind": s.profile.device_kind}  # fmt: skip
            return self.baselines.find(mine, uuids, self.spec(item).no_regression)

        runner.slos, runner.baseline = slos, stored

    @staticmethod
    def _message(data: dict[str, Any]) -> str:
        if data.get("kind") == "rack":
            return rackjudge.message(data)
        lines = [report.failure_message(data), *summary.regression_lines(data)]
        if data.get("parity") is not None:
            judged = {**data["parity"], "checks": data["checks"]}
            if any(c["kind"] in ("parity", "evidence") and not c["passed"] for c in data["checks"]):
                lines.append(report.parity_message(judged))
        return "\n".join(line for line in lines if line)

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
            and any(item.get_closest_marker(n) for n in ("throughput_floor", "latency_slo"))
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
