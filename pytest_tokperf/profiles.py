"""Hardware profiles: which engine runs, how big a default run is, and what it must reach.

The GPU profiles carry the published reference numbers (shared FACTS.md): Llama-2-70B
in FP4 with TensorRT-LLM did 1,100,948 output tokens/s on a GB300 NVL72 rack, about
15,290 per GPU, which the vendor rounds to 15,200; GB200 NVL72 did about 12,000 per GPU
and the H100 generation about 3,000. The cpu profile's floor is what the embedded
SmolLM2-135M engine sustains on a 2-core CI machine with a wide margin (it measured
about 108 output tokens/s there, single stream).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_tokperf.engines import BACKENDS

DEFAULT_PROFILE = "cpu"
ENV_PROFILE = "TOKPERF_PROFILE"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    backend: str
    device_kind: str  # "cpu" or "gpu": how a per-device number is named
    devices: int  # devices one engine uses (GPUs per node for the rack profiles)
    precision: str
    model: str
    requests: int  # default size of a run
    max_tokens: int
    warmup: int
    floors: Mapping[str, float] = field(default_factory=dict)  # marker keyword -> floor
    engine: Mapping[str, Any] = field(default_factory=dict)
    # scenario -> latency_slo keyword -> limit in ms: what a bare latency_slo marker gates
    slos: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


# MLPerf Inference Llama-2-70B (shared FACTS.md): Server p99 TTFT 2,000 ms and p99 TPOT
# 200 ms; Interactive p99 TTFT 450 ms and p99 TPOT 40 ms. The GPU profiles gate on them.
MLPERF_SLOS: dict[str, dict[str, float]] = {
    "server": {"ttft_p99_ms": 2_000.0, "tpot_p99_ms": 200.0},
    "interactive": {"ttft_p99_ms": 450.0, "tpot_p99_ms": 40.0},
}
# SmolLM2-135M on 2 CPU cores, one request at a time: see CPU_SLOS_MEASURED in README.
CPU_SLOS: dict[str, dict[str, float]] = {
    "server": {"ttft_p99_ms": 2_000.0, "tpot_p99_ms": 100.0},
    "interactive": {"ttft_p99_ms": 500.0, "tpot_p99_ms": 40.0},
}


BUILTIN: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="cpu",
            description="embedded llama.cpp engine on the CPU (SmolLM2-135M-Instruct)",
            backend="llamacpp",
            device_kind="cpu",
            devices=1,
            precision="q4_1",
            model="SmolLM2-135M-Instruct",
            requests=16,
            max_tokens=64,
            warmup=2,
            floors={"per_gpu": 10.0},
            slos=CPU_SLOS,
        ),
        Profile(
            name="sim",
            description="simulated engine (no model): dry-runs a suite in seconds",
            backend="sim",
            device_kind="cpu",
            devices=1,
            precision="none",
            model="sim",
            requests=16,
            max_tokens=64,
            warmup=0,
            floors={"per_gpu": 10.0},
            # 100 tokens/s per request, 4 at once: about 390 tokens/s in a closed loop
            engine={"tokens_per_s": 100.0, "ttft_s": 0.05, "jitter": 0.2, "slots": 4},
            slos=CPU_SLOS,
        ),
        Profile(
            name="h100-sxm",
            description="ND H100 v5 class node, 8 H100 GPUs, FP8 TensorRT-LLM",
            backend="trtllm",
            device_kind="gpu",
            devices=8,
            precision="fp8",
            model="llama2-70b",
            requests=24_576,
            max_tokens=1_024,
            warmup=64,
            floors={"per_gpu": 3_000.0},
            slos=MLPERF_SLOS,
        ),
        Profile(
            name="gb200-nvl72",
            description="GB200 NVL72 rack node, 4 GPUs, NVFP4 TensorRT-LLM",
            backend="trtllm",
            device_kind="gpu",
            devices=4,
            precision="nvfp4",
            model="llama2-70b",
            requests=24_576,
            max_tokens=1_024,
            warmup=64,
            floors={"per_gpu": 12_000.0},
            slos=MLPERF_SLOS,
        ),
        Profile(
            name="gb300-nvl72",
            description="GB300 NVL72 rack node, 4 GPUs, NVFP4 TensorRT-LLM",
            backend="trtllm",
            device_kind="gpu",
            devices=4,
            precision="nvfp4",
            model="llama2-70b",
            requests=24_576,
            max_tokens=1_024,
            warmup=64,
            floors={"per_gpu": 15_200.0},
            slos=MLPERF_SLOS,
        ),
    )
}


def select(option: str | None, ini: str, inifile: str | None) -> tuple[Profile, str]:
    """The active profile and where its name came from.

    Precedence: command line > environment > ini > default.
    """
    env = os.environ.get(ENV_PROFILE)
    if option:
        name, source = option, "--tokperf-profile"
    elif env:
        name, source = env, f"environment variable {ENV_PROFILE}"
    elif ini:
        name, source = ini, f"ini option tokperf_profile in {inifile or 'the ini file'}"
    else:
        name, source = DEFAULT_PROFILE, "default"
    if name not in BUILTIN:
        raise pytest.UsageError(
            f"unknown tokperf profile {name!r} (from {source}); "
            f"available: {', '.join(sorted(BUILTIN))}"
        )
    profile = BUILTIN[name]
    if profile.backend not in BACKENDS:
        raise pytest.UsageError(
            f"tokperf profile {name!r} (from {source}) runs the {profile.backend!r} engine, "
            f"which this version of pytest-tokperf does not include; "
            f"available engines: {', '.join(sorted(BACKENDS))} (profile 'cpu')"
        )
    return profile, source
