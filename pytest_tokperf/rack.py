"""The MPI world: one pytest session per node, meeting before each measured run.

`srun -N 18 --ntasks-per-node=1 pytest ...` or `mpiexec -n 18 pytest ...` runs the
same session on every rank. With more than one rank, `Rack` is registered as a
plugin; otherwise `Local` passes every result through unchanged, so no other code
asks whether it runs under MPI. mpi4py (extra `[rack]`) is imported only when the
launcher's environment says there is more than one rank.

Every wait has a deadline (`--tokperf-rack-timeout`): messages go point to point
through rank 0 with non-blocking sends and probes polled against the deadline, and
the start gun is a non-blocking barrier, so a rank that died or hangs makes the
others fail, naming it, instead of hanging them. The meetings:
- hello (session start): every rank's host, profile, engine and NVLink fabric;
  different profiles or engines make every rack test fail on every rank, alike.
- start (each measured run): every rank says ready, skipped or failed; rank 0
  answers go, skip or fail for all; then the barrier, whose exit time on each
  rank's wall clock gives its clock offset to rank 0.
- settle (each gated test): every node's payload and timeline go to rank 0, which
  judges the rack (`rackjudge`) and sends the one verdict back to every rank.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import pytest

from pytest_tokperf import rackjudge, verdict
from pytest_tokperf.rackjudge import Node, Timeline

DEFAULT_TIMEOUT_S = 900.0  # covers engines loading at different speeds and run-length spread
POLL_S = 0.0005
POLL_MAX_S = 0.01
# launchers' own word for the number of ranks: MPICH/Hydra and Slurm PMI, Open MPI, MVAPICH
SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
ENV_RACK = "TOKPERF_RACK"
OFF = ("0", "off", "false", "no")
Fabric = tuple[tuple[str | None, int | None, int | None], ...]


def world_size_from_env() -> int:
    for name in SIZE_ENV:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


class Local:
    """A world of one process: results pass through, nothing waits."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.host = socket.gethostname()

    @property
    def node(self) -> str:
        return self.host

    def start(self) -> None:
        pass

    def settle(
        self,
        nodeid: str,
        data: dict[str, Any],
        timeline: Timeline,
        *,
        floor: float | None,
        confidence: float,
        expected_nodes: int | None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the payload that decides the test, the payloads to record)."""
        return data, [data]

    def skipped_in_setup(self, reason: str) -> tuple[str, str]:
        return "skip", reason

    def abandon(self, status: str, started: bool) -> tuple[str, str] | None:
        return None


def connect(timeout_s: float, info: dict[str, Any], fabric: Fabric) -> Local | Rack:
    """The world this process is part of: `Rack` under MPI with more than one rank."""
    # off: one engine spans the MPI world (trtllm-llmapi-launch); pytest runs on rank 0 alone
    if world_size_from_env() < 2 or os.environ.get(ENV_RACK, "").lower() in OFF:
        return Local()
    try:
        import mpi4py

        # a dead peer makes MPI_Finalize hang: `Rack` finalizes itself only when all lived
        mpi4py.rc.finalize = False
        from mpi4py import MPI
    except ImportError:
        raise pytest.UsageError(
            "tokperf: launched as one of several MPI ranks, but mpi4py is missing: "
            "pip install 'pytest-tokperf[rack]'"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        return Local()
    return Rack(comm, timeout_s, info, fabric)


class RackError(Exception):
    """A meeting could not complete; the message names the rank(s) and host(s)."""


class Rack:
    """This rank's view of a rack run (registered as a plugin when size > 1)."""

    def __init__(self, comm: Any, timeout_s: float, info: dict[str, Any], fabric: Fabric) -> None:
        self.comm = comm
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()
        self.host = socket.gethostname()
        self.timeout_s = timeout_s
        self.info = {**info, "host": self.host}
        self.fabric = fabric
        self.alive = set(range(self.size))
        self.hosts: dict[int, str] = {self.rank: self.host}
        self.broken: str | None = None  # why this rack can no longer meet
        self.barrier_wall_ns = 0
        self.decided = False  # a meeting ended this test on every rank (skip or fail)
        self._tag = 0
        self._sending: list[Any] = []
        self._hello_done = False
        atexit.register(self._finalize)

    @property
    def node(self) -> str:
        return f"{self.host}/rank{self.rank}"

    def label(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts.get(rank, 'host unknown')})"

    # --- transport: point to point through rank 0, every wait with a deadline ---

    def _next_tag(self) -> int:
        self._tag = self._tag % 30_000 + 1  # MPI guarantees tags up to 32767
        return self._tag

    def _send(self, value: Any, dest: int, tag: int) -> None:
        self._sending = [r for r in self._sending if not r.Test()]
        self._sending.append(self.comm.isend(value, dest=dest, tag=tag))

    def _receive(self, source: int, tag: int, deadline: float) -> tuple[bool, Any]:
        pause = POLL_S
        while True:
            message = self.comm.improbe(source=source, tag=tag)
            if message is not None:
                return True, message.recv()
            if time.monotonic() > deadline:
                return False, None
            time.sleep(pause)
            pause = min(POLL_MAX_S, pause * 1.5)  # long waits (engines loading) stay cheap

    def _gather(self, value: Any) -> dict[int, Any]:
        """Rank 0: the values of every live rank that arrived in time; others: {}."""
        tag = self._next_tag()
        if self.rank != 0:
            self._send(value, 0, tag)
            return {}
        deadline = time.monotonic() + self.timeout_s
        got = {0: value}
        for source in sorted(self.alive - {0}):
            ok, received = self._receive(source, tag, deadline)
            if ok:
                got[source] = received
        return got

    def _bcast(self, value: Any) -> Any:
        """Rank 0's value on every live rank; RackError where it did not come in time."""
        tag = self._next_tag()
        if self.rank == 0:
            for dest in sorted(self.alive - {0}):
                self._send(value, dest, tag)
            return value
        # rank 0 may itself wait a whole timeout for a lost rank before it answers
        ok, received = self._receive(0, tag, time.monotonic() + 2 * self.timeout_s + 5)
        if not ok:
            self.broken = (
                f"{self.label(0)} sent no answer within {self.timeout_s:g} s "
                "(--tokperf-rack-timeout): it died or hangs"
            )
            raise RackError(self.broken)
        return received

    def _lost(self, ranks: Sequence[int], where: str) -> str:
        names = ", ".join(self.label(r) for r in ranks)
        return (
            f"{names} did not reach the {where} within {self.timeout_s:g} s "
            "(--tokperf-rack-timeout): it died, hangs or runs other tests"
        )

    def _finalize(self) -> None:
        if self.broken is None and len(self.alive) == self.size:
            from mpi4py import MPI

            if not MPI.Is_finalized():
                for request in self._sending:
                    request.Wait()
                MPI.Finalize()

    # --- meetings ---

    def hello(self) -> None:
        """Learn every rank's host and check they all run the same thing (once)."""
        if self._hello_done:
            return
        self._hello_done = True
        got = self._gather(self.info)
        answer: dict[str, Any] = {}
        if self.rank == 0:
            missing = sorted(self.alive - set(got))
            self.hosts.update({r: str(v["host"]) for r, v in got.items()})
            why = self._lost(missing, "session start") if missing else None
            if why is None:
                keys = ("profile", "backend", "model", "precision")
                odd = [r for r in sorted(got) if [got[r][k] for k in keys] !=
                       [got[0][k] for k in keys]]  # fmt: skip
                if odd:
                    why = "ranks run different profiles or engines: " + "; ".join(
                        f"{self.label(r)}: " + ", ".join(f"{k} {got[r][k]}" for k in keys)
                        for r in [0, *odd]
                    )
            answer = {"hosts": self.hosts, "alive": sorted(got), "broken": why}
        try:
            answer = self._bcast(answer)
        except RackError:
            return
        self.hosts = {int(r): h for r, h in answer["hosts"].items()}
        self.alive = set(answer["alive"])
        self.broken = answer["broken"]

    def start(self) -> None:
        """Before a measured run: all ranks ready, then started together (or all stop)."""
        outcome, why = self._meet("ready")
        self.decided = outcome != "go"
        if outcome == "skip":
            pytest.skip(why)
        if outcome == "fail":
            pytest.fail(why, pytrace=False)

    def _meet(self, status: str) -> tuple[str, str]:
        """('go' | 'skip' | 'fail', why) for every rank alike."""
        self.hello()
        if self.broken is not None:
            return "fail", f"rack: {self.broken}"
        got = self._gather(status)
        answer = ("go", "")
        if self.rank == 0:
            missing = sorted(self.alive - set(got))
            self.alive -= set(missing)
            others = [(r, s) for r, s in sorted(got.items()) if s != "ready"]
            if missing:
                self.broken = self._lost(missing, "start of a measured run")
                answer = ("fail", f"rack: {self.broken}")
            elif others:
                r, s = others[0]
                kind = "skip" if s.startswith("skipped") else "fail"
                answer = (kind, f"rack incomplete: {self.label(r)} {s}")
        try:
            kind, why, alive, broken = self._bcast((*answer, sorted(self.alive), self.broken))
        except RackError as exc:
            return "fail", f"rack: {exc}"
        self.alive, self.broken = set(alive), broken
        if kind == "go":
            self._barrier()
        return kind, why

    def _barrier(self) -> None:
        """The start gun: a non-blocking barrier polled against the deadline."""
        request = self.comm.Ibarrier()
        deadline = time.monotonic() + self.timeout_s
        while not request.Test():
            if time.monotonic() > deadline:
                self.broken = self._lost(sorted(self.alive - {self.rank}), "start barrier")
                pytest.fail(f"rack: {self.broken}", pytrace=False)
            time.sleep(POLL_S / 5)
        self.barrier_wall_ns = time.time_ns()

    def skipped_in_setup(self, reason: str) -> tuple[str, str]:
        """A gated test skipped here before its run: tell the others; what all ranks do."""
        kind, why = self._meet(f"skipped: {reason}")
        return ("fail", why) if kind == "fail" else ("skip", why)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self) -> None:
        self.decided = False

    def abandon(self, status: str, started: bool) -> tuple[str, str] | None:
        """This rank's gated test ended early: tell the ranks waiting for it, and say
        what every rank reports ('skip' or 'fail', why); None: already decided."""
        if self.decided or self.broken is not None:
            return None  # a meeting already decided this test for every rank
        if not started:
            kind, why = self._meet(status)
            return ("skip", why) if kind == "skip" else ("fail", why)
        ended = verdict.check("error", "FAIL", "requests", status)  # the test raised
        failed = {"verdict": verdict.decide([ended]), "error": status,
                  "checks": [dataclasses.asdict(ended)]}  # fmt: skip
        row, _ = self._settle_nodes("", failed, Timeline(0, 0, ()), None, 0.95, None)
        return "fail", rackjudge.message(row) if row.get("rack") else status

    def settle(
        self,
        nodeid: str,
        data: dict[str, Any],
        timeline: Timeline,
        *,
        floor: float | None,
        confidence: float,
        expected_nodes: int | None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Every node's result to rank 0, one rack verdict back to every rank."""
        row, nodes = self._settle_nodes(nodeid, data, timeline, floor, confidence, expected_nodes)
        if self.rank != 0:
            return row, [rackjudge.node_row(nodeid, data, self.rank, self.host), row]
        return row, [*(rackjudge.node_row(nodeid, n.payload, n.rank, n.host) for n in nodes), row]

    def _settle_nodes(
        self,
        nodeid: str,
        data: dict[str, Any],
        timeline: Timeline,
        floor: float | None,
        confidence: float,
        expected_nodes: int | None,
    ) -> tuple[dict[str, Any], list[Node]]:
        if self.broken is not None:
            return _failed_row(nodeid, data, f"rack: {self.broken}"), []
        mine = Node(self.rank, self.host, data, timeline, 0, self.fabric).to_json()
        got = self._gather({**mine, "barrier_wall_ns": self.barrier_wall_ns})
        nodes: list[Node] = []
        row: dict[str, Any] = {}
        if self.rank == 0:
            missing = sorted(self.alive - set(got))
            self.alive -= set(missing)
            zero = int(got[0]["barrier_wall_ns"])
            for r in sorted(got):
                node = Node.from_json(got[r])
                offset = int(got[r]["barrier_wall_ns"]) - zero
                nodes.append(Node(node.rank, node.host, node.payload, node.timeline,
                                  offset, node.fabric))  # fmt: skip
            row = rackjudge.judge(
                nodeid,
                nodes,
                floor=floor,
                confidence=confidence,
                missing=[self.label(r) for r in missing],
                expected_nodes=expected_nodes,
            )
            if missing:
                self.broken = self._lost(missing, "end of a measured run")
        try:
            row, alive, broken = self._bcast((row, sorted(self.alive), self.broken))
        except RackError as exc:
            return _failed_row(nodeid, data, f"rack: {exc}"), nodes
        self.alive, self.broken = set(alive), broken
        return row, nodes


def _failed_row(nodeid: str, data: dict[str, Any], why: str) -> dict[str, Any]:
    """The verdict when no rack verdict could be had: FAIL, saying why."""
    lost = verdict.check("rack", "FAIL", "node", why)
    return {**data, "nodeid": nodeid, "kind": "rack", "verdict": verdict.decide([lost]),
            "failures": [why], "invalid": [], "checks": [dataclasses.asdict(lost)], "notes": [],
            "rack": {"nodes": [], "missing": [], "window": {"overlap": 0.0}}}  # fmt: skip
