"""The harness: every expensive resource of a pytest process, and their closing.

NVML and the GPU inventory, the MPI world, the event loop, this process's GPUs, the
engine under test and its reference engines, the servers launched for them, and how a
client process loads the engine. Registered as the plugin "tokperf-harness"; it closes
what it opened when the session finishes, after `results` has written the results.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Generator
from typing import Any

import pytest

from pytest_tokperf import (
    driver,
    hardware,
    launcher,
    machine,
    procs,
    rack,
    records,
    reference,
    settings,
)
from pytest_tokperf.engines import Engine, EngineError, load_engine


class Harness:
    """Opened at configure time; engines, servers and the loop only when a test needs them."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.nvml, why_not = hardware.load_nvml()
        # an outer scheduler's CUDA_VISIBLE_DEVICES: only those GPUs are ours to take
        self.inventory = hardware.read_inventory(self.nvml, why_not).restrict(
            os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        # the profile may be chosen by these GPUs
        self.settings = s = settings.resolve(config, self.inventory)
        # xdist workers inherit the launcher's MPI environment but are no MPI ranks
        # (xdist's documented marker of a worker process)
        connect = rack.connect if not hasattr(config, "workerinput") else lambda *_: rack.Local()
        self.world = connect(
            s.rack_timeout,
            {"profile": s.profile.name, "backend": s.backend,
             "model": s.profile.model, "precision": s.profile.precision},
            tuple((g.fabric_cluster, g.fabric_clique, g.fabric_state)
                  for g in self.inventory.gpus),
        )  # fmt: skip
        if isinstance(self.world, rack.Rack):
            config.pluginmanager.register(self.world, "tokperf-rack")
        self.records = None
        if s.records_path is not None:
            rank = self.world.rank if self.world.size > 1 else None
            self.records = records.Writer(s.records_path, self.world.node, rank)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.allocation: hardware.Allocation | None = None
        self.server: launcher.Server | None = None
        self.reference_servers: list[launcher.Server] = []
        self.references: dict[str, Engine] = {}  # reference engines by precision, lazily
        self.spawn: procs.Spawn | None = None  # how a client process loads the engine
        # whose process tree a run's own CPU is counted in (machine.py): under xdist or
        # MPI the parent's, whose other workers or ranks share the machine on purpose
        shared = hasattr(config, "workerinput") or self.world.size > 1
        self.tree_root = machine.tree_root(shared)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """One event loop for the process: engines keep their connection pools on it."""
        if self._loop is None or self._loop.is_closed():
            self._loop = driver.new_loop()
        return self._loop

    def allocate(self) -> hardware.Allocation:
        """This process's GPUs for the profile (the CPU device for a cpu profile).

        Not enough suitable free GPUs skips the tests that need them, or fails them
        with --tokperf-require-hardware.
        """
        s = self.settings
        if s.unmatched is not None:
            pytest.fail(s.unmatched, pytrace=False)
        if s.profile.device_kind != "gpu":
            allocation = hardware.Allocation()
        else:
            need = s.profile.need(s.gpu_count)
            try:
                allocation = hardware.allocate(
                    self.inventory, need, s.lock_dir, s.allow_busy, wait_s=s.gpu_wait
                )
            except hardware.Shortage as exc:
                if s.require_hardware:
                    pytest.fail(f"{exc} (--tokperf-require-hardware)", pytrace=False)
                pytest.skip(str(exc))
        self.allocation = allocation  # a launched server inherits its locks
        return allocation

    def engine_settings(self, at: str | None = None) -> dict[str, Any]:
        """The backend's settings for the profile's engine (at precision `at`)."""
        s, profile = self.settings, self.settings.profile
        out = dict(profile.engine) if s.backend == profile.backend else {}
        if s.backend == "trtllm":
            out.setdefault("model", profile.model)  # a user profile's checkpoint
            if profile.tensor_parallel_size > 1:
                out["tensor_parallel_size"] = profile.tensor_parallel_size
        if s.backend == "llamacpp":
            if s.model_path is not None:
                out["model_path"] = str(s.model_path)
            out["precision"] = at or profile.precision
        if s.backend == "openai":
            out.update(s.server_settings)
        if s.backend == "transformers":
            if s.model_path is not None:
                out["model"] = str(s.model_path)
            if at is not None:
                out["dtype"] = at
        return out

    def open_engine(self, allocation: hardware.Allocation) -> Engine:
        """The engine under test on `allocation`, behind its launched server if any."""
        backend, options = self.settings.backend, self.engine_settings()
        try:
            if self.settings.server_cmd is not None:
                self.server = launcher.start(
                    self.settings.server_cmd,
                    options.get("base_url"),
                    pass_fds=allocation.fds,
                )
                options["base_url"] = self.server.base_url
            devices = self.devices(allocation.devices)
            engine = load_engine(backend, options, devices)
            self.spawn = procs.Spawn(backend, options, devices)
        except (EngineError, launcher.LaunchError) as exc:
            pytest.fail(f"tokperf could not load its engine: {exc}", pytrace=False)
        return engine

    def devices(self, allocated: int) -> int:
        """The devices per-GPU numbers divide by: the allocation's, except for a server
        this session did not launch, whose GPUs are the profile's (`devices`), not the
        ones the client happens to hold."""
        s = self.settings
        if s.backend == "openai" and s.server_cmd is None:
            return s.profile.devices
        return allocated

    def reference_engine(self, at: str) -> Engine:
        """The reference engine at precision `at` (see reference.py), loaded once."""
        if at in self.references:
            return self.references[at]
        s = self.settings
        fds = self.allocation.fds if self.allocation else ()
        try:
            plan = reference.plan(
                s.backend,
                self.engine_settings(at),
                s.profile,
                at,
                lambda name: (settings.setting(self.config, name) or (None, ""))[0],
                self.server.base_url if self.server else s.server_settings.get("base_url"),
            )
            if plan.server_cmd is not None:
                server = launcher.start(plan.server_cmd, pass_fds=fds)
                self.reference_servers.append(server)
                plan.settings["base_url"] = server.base_url
            allocated = self.allocation.devices if self.allocation else s.profile.devices
            engine = load_engine(s.backend, plan.settings, self.devices(allocated))
        except reference.Missing as exc:
            why = f"no reference for accuracy parity: {exc}"
        except (EngineError, launcher.LaunchError) as exc:
            why = f"tokperf could not load its {at} reference engine: {exc}"
        else:
            self.references[at] = engine
            return engine
        pytest.fail(why, pytrace=False)  # outside the except: no chained traceback

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        s, p = self.settings, self.settings.profile
        if s.unmatched is not None:
            return [
                "tokperf: no profile matches these GPUs (tests that use tokperf stop)",
                f"tokperf: GPUs: {self.inventory.describe()}",
            ]
        model = s.model_path.name if s.model_path else f"{p.model} {p.precision}"
        if s.backend == "openai":
            url = s.server_settings.get("base_url", "no --tokperf-base-url")
            model = f"{s.server_settings.get('model', 'first served')} at {url}"
        unit = "GPU" if p.device_kind == "gpu" else "device"
        # --tokperf-gpus changes what a GPU profile allocates; the cpu profile is one device
        devices = (s.gpu_count or p.devices) if p.device_kind == "gpu" else p.devices
        return [
            f"tokperf: profile {p.name} ({s.profile_source}), engine {s.backend}, "
            f"model {model}, {devices} {unit}{'' if devices == 1 else 's'}",
            f"tokperf: GPUs: {self.inventory.describe()}",
        ]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        # registered after the gate, so this sees the outcome the gate decided
        rep = yield
        if rep.failed and self.server is not None:
            # a failing perf test against a launched server gets that server's log
            rep.sections.append(("tokperf server log (tail)", self.server.log_tail()))
        return rep

    def pytest_sessionfinish(self) -> None:
        # results' sessionfinish runs first (tryfirst): the results are written before this
        for engine in self.references.values():
            self.loop.run_until_complete(engine.aclose())
        self.references.clear()
        for server in (self.server, *self.reference_servers):
            if server is not None:
                server.stop()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
