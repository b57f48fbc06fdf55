"""GPU profiles through whole pytest runs, on recorded NVML inventories and real locks.

`TOKPERF_NVML_RECORDING` makes the plugin read a recorded inventory instead of the
real NVML; every run gets its own lock directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent.parent / "data" / "nvml"
QUIET = ("-p", "no:cacheprovider")
MARKED = """
import pytest

@pytest.mark.throughput_floor(per_gpu={"gb300-nvl72": 15_200, "cpu": 1})
def test_floor(tokperf):
    tokperf.run()

def test_gpus(tokperf_gpus):
    pass
"""
NO_GPUS = (
    "profile gb300-nvl72 needs 4 GPUs matching 'GB300' with at least 250 GiB, "
    "compute capability 10.3; "
    "this machine has no GPUs (NVML: NVML Shared Library Not Found)"
)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch, pytester: pytest.Pytester):
    """Replay the named recorded inventory; locks go to this test's own directory."""
    monkeypatch.delenv("TOKPERF_PROFILE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("TOKPERF_LOCK_DIR", str(pytester.path / "locks"))

    def use(name: str) -> None:
        monkeypatch.setenv("TOKPERF_NVML_RECORDING", str(DATA / name))

    return use


def test_gb300_profile_skips_here_naming_the_missing_hardware(
    pytester: pytest.Pytester, recording
) -> None:
    recording("no-driver.json")
    pytester.makepyfile(test_suite=MARKED)
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "gb300-nvl72", "-rs",
                                "--tokperf-json", "out.json")  # fmt: skip
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        [
            "tokperf: profile gb300-nvl72 (--tokperf-profile), engine trtllm, *4 GPUs",
            "tokperf: GPUs: no GPUs (NVML: NVML Shared Library Not Found)",
            f"SKIPPED [[]1[]] test_suite.py:3: {NO_GPUS}",
            f"SKIPPED [[]1[]] test_suite.py:7: {NO_GPUS}",
        ]
    )
    doc = json.loads((pytester.path / "out.json").read_text())
    assert doc["inventory"]["gpus"] == [] and "Library Not Found" in doc["inventory"]["error"]
    (test,) = doc["tests"]
    assert test["verdict"] == "SKIPPED" and test["reason"] == NO_GPUS


def test_the_real_nvml_of_this_machine_skips_too(pytester: pytest.Pytester, recording) -> None:
    from pytest_tokperf.hardware.inventory import load_nvml, read_inventory

    if read_inventory(*load_nvml()).gpus:
        pytest.skip("this machine has NVIDIA GPUs")
    pytester.makepyfile(test_suite=MARKED)
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "gb300-nvl72", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["tokperf: GPUs: no GPUs *", "SKIPPED * needs 4 GPUs matching*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_require_hardware_turns_the_skip_into_an_error(
    pytester: pytest.Pytester, recording
) -> None:
    recording("no-driver.json")
    pytester.makepyfile(test_suite=MARKED)
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "gb300-nvl72",
                                "--tokperf-require-hardware")  # fmt: skip
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([f"*{NO_GPUS} (--tokperf-require-hardware)"])


def test_detected_gb300_node_allocates_then_names_the_missing_engine_package(
    pytester: pytest.Pytester, recording
) -> None:
    recording("gb300-node-4.json")
    pytester.makepyfile(
        test_suite="""
        import os

        def test_visible(tokperf_gpus):
            assert tokperf_gpus.devices == 4
            assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(tokperf_gpus.uuids)
            assert all(u.startswith("GPU-9f8e7d") for u in tokperf_gpus.uuids)

        def test_engine(tokperf_engine):
            pass
        """
    )
    result = pytester.runpytest(*QUIET)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "tokperf: profile gb300-nvl72 (detected: 4 x NVIDIA GB300), engine trtllm, *4 GPUs",
            "tokperf: GPUs: 4 x NVIDIA GB300 (driver 580.65.06, CUDA 13.0, recorded in *)",
            "*the 'trtllm' engine needs the Python module 'tensorrt_llm', which is not "
            "installed; install it with: pip install 'pytest-tokperf?trtllm?'*",
        ]
    )


def test_busy_gpus_skip_unless_allowed(pytester: pytest.Pytester, recording) -> None:
    recording("h100-busy.json")
    pytester.makefile(".toml", tokperf='[profiles.pair]\nextends = "h100-sxm"\ndevices = 2')
    pytester.makepyfile(
        test_suite="""
        def test_gpus(tokperf_gpus):
            assert tokperf_gpus.devices == 2
        """
    )
    result = pytester.runpytest(*QUIET, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "tokperf: profile pair (detected: 2 x NVIDIA H100 80GB HBM3)*",
            "SKIPPED * profile pair needs 2 GPUs *; 1 of 2 GPUs here are suitable; GPU 0 * "
            "busy with foreign compute processes (pid 4242)*",
        ]
    )
    pytester.runpytest(*QUIET, "--tokperf-allow-busy-gpus").assert_outcomes(passed=1)
    # one GPU is enough when asked for one, and the header says so
    result = pytester.runpytest(*QUIET, "--tokperf-gpus", "1")
    result.assert_outcomes(passed=0, failed=1)
    result.stdout.fnmatch_lines(["tokperf: profile pair * 1 GPU", "*assert 1 == 2*"])


def test_a_broken_user_profile_stops_the_run(pytester: pytest.Pytester, recording) -> None:
    recording("no-driver.json")
    pytester.makepyprojecttoml(
        '[tool.tokperf.profiles.mine]\nextends = "gb300-nvl72"\nfloors = { per_gpu = "fast" }\n'
    )
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(*QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: *pyproject.toml: profile 'mine': key 'floors': per_gpu: expected a number*"]
    )


def test_user_profile_names_are_valid_floor_keys(pytester: pytest.Pytester, recording) -> None:
    recording("no-driver.json")
    pytester.makefile(".toml", tokperf='[profiles.mine]\nextends = "gb300-nvl72"')
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.throughput_floor(per_gpu={"mine": 14_400})
        def test_floor(tokperf):
            pass
        """
    )
    result = pytester.runpytest(*QUIET, "--tokperf-profile", "mine", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * profile mine needs 4 GPUs matching 'GB300'*"])


def test_xdist_workers_hold_disjoint_gpus(pytester: pytest.Pytester, recording) -> None:
    recording("h100-sxm-8.json")
    held = pytester.path / "held"
    held.mkdir()
    pytester.makefile(".toml", tokperf='[profiles.half]\nextends = "h100-sxm"\ndevices = 4')
    pytester.makepyfile(
        test_hold=f"""
        import os, pathlib, time

        HELD = pathlib.Path({str(held)!r})

        def test_hold(tokperf_gpus):
            me = os.environ["PYTEST_XDIST_WORKER"]
            (HELD / (me + ".tmp")).write_text(os.environ["CUDA_VISIBLE_DEVICES"])
            (HELD / (me + ".tmp")).rename(HELD / me)
            # keep the GPUs until the other worker holds its own: both hold at once
            deadline = time.monotonic() + 120
            while len(list(HELD.glob("gw*[0-9]"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert tokperf_gpus.devices == 4
        """
    )
    result = pytester.runpytest_subprocess(*QUIET, "-n", "2", "--dist", "each")
    result.assert_outcomes(passed=2)
    got = {p.name: set(p.read_text().split(",")) for p in held.glob("gw*[0-9]")}
    assert sorted(got) == ["gw0", "gw1"]
    assert len(got["gw0"]) == len(got["gw1"]) == 4
    assert got["gw0"].isdisjoint(got["gw1"])
    doc = json.loads((DATA / "h100-sxm-8.json").read_text())
    assert got["gw0"] | got["gw1"] == {g["uuid"] for g in doc["gpus"]}


def test_cpu_runs_record_process_cpu_and_the_inventory(
    pytester: pytest.Pytester, recording
) -> None:
    recording("no-driver.json")
    pytester.makepyfile(
        """
        def test_measured(tokperf):  # no floor: measured and reported, not gated
            tokperf.run(warmup=0)
        """
    )
    result = pytester.runpytest(*QUIET, "--tokperf-requests", "2", "--tokperf-max-tokens", "4",
                                "--tokperf-json", "out.json")  # fmt: skip
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["test * TTFT p99 * proc CPU * verdict", "*/* MEASURED*"])
    doc = json.loads((pytester.path / "out.json").read_text())
    assert doc["inventory"]["error"] == "NVML: NVML Shared Library Not Found"
    (test,) = doc["tests"]
    cpu = test["telemetry"]["cpu"]
    assert test["telemetry"]["gpu"] is None and test["gpus"] == []
    assert test["client_busy_cores"] == pytest.approx(cpu["cpu_s"] / cpu["wall_s"])
    # the sampler's window holds the measured run (it starts before the first issue)
    assert cpu["wall_s"] >= test["duration_s"] > 0
    # this process's CPU (the engine's child is not in it): a 2-request run may stay
    # under os.times()'s 10 ms resolution
    assert cpu["cores"] >= 1 and cpu["cpu_s"] >= 0
    assert test["energy_j_per_token"] is None and test["throttled"] is None


H200_UUIDS = [g["uuid"] for g in json.loads((DATA / "h200-8.json").read_text())["gpus"]]


def test_an_h200_box_detects_h200_which_has_no_default_floor(
    pytester: pytest.Pytester, recording
) -> None:
    recording("h200-8.json")
    pytester.makepyfile(
        test_suite="""
        import pytest

        def test_one_gpu_per_engine(tokperf_gpus):
            assert tokperf_gpus.devices == 1

        @pytest.mark.throughput_floor()
        def test_default_floor():
            pass
        """
    )
    result = pytester.runpytest(*QUIET)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "tokperf: profile h200 (detected: 8 x NVIDIA H200), engine trtllm, "
            "model llama2-70b fp8, 1 GPU",
            "*throughput_floor() sets no floor, and profile 'h200' has no default floor: "
            "give min_tokens_per_s=... or per_gpu=... in the marker, or floors in your profile",
        ]
    )


def test_gpus_no_profile_matches_stop_a_tokperf_run(pytester: pytest.Pytester, recording) -> None:
    recording("l40s-2.json")
    pytester.makepyfile(test_plain="def test_plain(): pass")
    # a suite that does not use tokperf is not its business
    pytester.runpytest(*QUIET).assert_outcomes(passed=1)
    pytester.makepyfile(test_perf="def test_gpus(tokperf_gpus): pass")
    result = pytester.runpytest(*QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["tokperf: no profile matches these GPUs *"])
    result.stderr.fnmatch_lines(
        [
            "ERROR: no tokperf GPU profile matches this machine's GPUs: 2 x NVIDIA L40S *; "
            "GPU 0 is 'NVIDIA L40S', 45 GiB, compute capability 8.9. tokperf does not fall "
            "back to the cpu profile while NVML sees GPUs*",
            "[[]tool.tokperf.profiles.nvidia-l40s[]]",
            'extends = "h200" *',
        ]
    )
    # an xdist worker cannot stop the run with a usage error: its tokperf tests error
    result = pytester.runpytest_subprocess(*QUIET, "-n", "1", "test_perf.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["ERROR test_perf.py::test_gpus - Failed: no tokperf GPU prof*"])
    # naming a profile is the way out: cpu runs the embedded engine's device
    pytester.runpytest(*QUIET, "--tokperf-profile", "cpu").assert_outcomes(passed=2)


def test_an_inherited_cuda_visible_devices_limits_allocation(
    pytester: pytest.Pytester, recording, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording("h200-8.json")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    pytester.makepyfile(
        test_suite=f"""
        import os

        def test_gpus(tokperf_gpus):
            assert tokperf_gpus.uuids == ({H200_UUIDS[1]!r},)
            assert os.environ["CUDA_VISIBLE_DEVICES"] == {H200_UUIDS[1]!r}
        """
    )
    result = pytester.runpytest(*QUIET)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["tokperf: GPUs: 1 x NVIDIA H200 (driver *, CUDA_VISIBLE_DEVICES=1)"]
    )
    result = pytester.runpytest(*QUIET, "--tokperf-gpus", "2", "--tokperf-require-hardware")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*profile h200 needs 2 GPUs * 1 of 1 GPUs here are suitable*"])
    result = pytester.runpytest(*QUIET, "--tokperf-gpu-wait", "soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --tokperf-gpu-wait must be a number of seconds >= 0*"])
