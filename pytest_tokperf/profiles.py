"""Hardware profiles: which engine runs, how big a default run is, and what it must reach.

The GPU profiles carry the published reference numbers (Microsoft Azure's ND GB300 v6
result, an unverified MLPerf Inference v5.1 submission, November 2025): Llama-2-70B
in FP4 with TensorRT-LLM did 1,100,948 output tokens/s on a GB300 NVL72 rack, about
15,290 per GPU, which the vendor rounds to 15,200; GB200 NVL72 did about 12,000 per GPU
and the H100 generation about 3,000. The cpu profile's floor is what the embedded
SmolLM2-135M engine sustains on a 2-core CI machine with a wide margin (5 output
tokens/s: it measured 38-45 there in Offline runs, and 8-12 per xdist worker with
`-n 2` while the machine was busy with other jobs).

A profile also says which hardware it needs (GPU name pattern, GPUs per node,
minimum memory), so the plugin can allocate GPUs for it or detect it from the NVML
inventory. Users define or extend profiles in TOML: `[tool.tokperf.profiles.NAME]`
in the rootdir's pyproject.toml or `[profiles.NAME]` in its tokperf.toml.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pytest

from pytest_tokperf import mlperf_models, workloads
from pytest_tokperf.driver import SCENARIOS
from pytest_tokperf.hardware.allocation import Need, unsuitable
from pytest_tokperf.hardware.inventory import Inventory
from pytest_tokperf.slo import SLO_KEYWORDS
from pytest_tokperf.verdict import FLOOR_METRICS, finite

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_PROFILE = "cpu"
ENV_PROFILE = "TOKPERF_PROFILE"
BACKEND_NAMES = (
    "llamacpp",
    "openai",
    "trtllm",
    "sim",
    "transformers",
)  # known names; `engines.BACKENDS` is what ships
# a profile's `slos` table: scenario -> latency_slo keyword (ttft_p99_ms, ...) -> ms
SLO_SCENARIOS = SCENARIOS
# MLPerf's accuracy rule (mlcommons/inference_policies, inference_rules.adoc): each
# ROUGE >= 99% of the reference, tokens per sample within 90%-110% of the reference's
PARITY_KEYS = ("rouge_fraction", "tokens_per_sample_low", "tokens_per_sample_high")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    backend: str
    device_kind: str  # "cpu" or "gpu": how a per-device number is named
    devices: int  # devices one engine uses: the GPUs allocated (a node's GPUs on a rack)
    precision: str
    model: str
    requests: int  # default size of a run
    max_tokens: int
    warmup: int
    floors: Mapping[str, float] = field(default_factory=dict)  # marker keyword -> floor
    engine: Mapping[str, Any] = field(default_factory=dict)  # extra engine arguments
    # hardware match: which GPUs may serve this profile
    gpu_name: str = ""  # regular expression searched in NVML's GPU name, any case
    min_memory_gib: float = 0.0
    nodes: int = 1  # nodes of `devices` GPUs in the whole system (18 on an NVL72 rack)
    tensor_parallel_size: int = 1
    rack_floor: float | None = None  # output tokens/s of all `nodes` together
    # scenario -> latency_slo keyword -> limit in ms: what a bare latency_slo marker gates
    slos: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    parity: Mapping[str, float] = field(default_factory=dict)  # PARITY_KEYS -> fraction
    defined_in: str = "built-in"  # or the file that defined it
    # accuracy parity: the precision a test engine is compared with (None: none named)
    reference_precision: str | None = None
    # the workload a run without one measures, when the floors were measured on it: a
    # JSONL path, or a name (MLPERF_OPENORCA) whose file --tokperf-dataset gives
    dataset: str | None = None
    compute_capability: tuple[int, int] | None = None  # hardware match, besides the name
    # accuracy parity on an engine that loads a checkpoint (trtllm): the reference's
    reference_model: str | None = None
    # seconds a run that judges floors or SLOs must last: no early verdict before, and a
    # shorter run cannot PASS (an engine's slow side, heat or a filling cache, takes time)
    min_duration_s: float = 0.0
    # GPUs that slowed their clocks during a run (thermal, power): "note" (the
    # deployment's own behaviour, which a long enough run includes) or "invalid"
    throttled: str = "note"
    # allowed drop of tokens/s against a baseline when neither the marker nor
    # --tokperf-max-regression says (None: 0.05); a machine's run-to-run noise sets it
    max_regression: float | None = None

    def need(self, count: int | None = None) -> Need:
        """What this profile asks of the GPUs; `count` overrides `devices`."""
        return Need(
            self.name,
            count or self.devices,
            self.gpu_name,
            self.min_memory_gib,
            self.compute_capability,
        )


# MLPerf Inference Llama-2-70B (mlcommons/inference_policies, inference_rules.adoc):
# Server p99 TTFT 2,000 ms and p99 TPOT 200 ms; Interactive p99 TTFT 450 ms and p99
# TPOT 40 ms. The GPU profiles gate on them.
MLPERF_SLOS: dict[str, dict[str, float]] = {
    "server": {"ttft_p99_ms": 2_000.0, "tpot_p99_ms": 200.0},
    "interactive": {"ttft_p99_ms": 450.0, "tpot_p99_ms": 40.0},
}
# SmolLM2-135M on 2 CPU cores, one request at a time: see CPU_SLOS_MEASURED in README.
CPU_SLOS: dict[str, dict[str, float]] = {
    "server": {"ttft_p99_ms": 2_000.0, "tpot_p99_ms": 100.0},
    "interactive": {"ttft_p99_ms": 500.0, "tpot_p99_ms": 40.0},
}
MLPERF_PARITY = {
    "rouge_fraction": 0.99,
    "tokens_per_sample_low": 0.9,
    "tokens_per_sample_high": 1.1,
}
# The published floors are MLPerf Offline on its OpenOrca set, EOS honoured, measured
# as trtllm-bench does (no KV-cache block reuse): the trtllm engine's defaults are the
# last two (not written into `engine`: a profile extending these may use another
# backend), the dataset is required here.
_LLAMA2_70B: dict[str, Any] = {
    "model": "llama2-70b",
    "dataset": workloads.MLPERF_OPENORCA,
    "requests": 24_576,
    "max_tokens": 1_024,
    "warmup": 64,
    "slos": MLPERF_SLOS,
    "parity": MLPERF_PARITY,
    # MLPerf's min_duration (loadgen/mlperf.conf): long enough for thermal and power
    # steady state before a result counts
    "min_duration_s": 600.0,
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
            floors={"per_gpu": 5.0},
            reference_precision="f16",
            slos=CPU_SLOS,
            min_duration_s=10.0,
            # a laptop or shared CI VM drifts more between runs than within one: an
            # unchanged rerun of examples/ 4 minutes later on an idle 2-core Intel Xeon
            # VM ran its Offline tests 7-15% slower (95% intervals down to -21%), and one
            # test's rate moved 67.6 -> 59.2 -> 54 tokens/s over 30 minutes (2026-12-08;
            # on AMD EPYC 2-7% apart). A cpu comparison catches regressions of a quarter
            # or more; `calibrate` measures a machine's own drift for a tighter gate
            max_regression=0.25,
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
            min_duration_s=10.0,
        ),
        # The memory minimums sit well under the nominal 80 / 186 / 288 GB, so they
        # reject a smaller part of the same name, never a healthy GPU whose driver
        # reserves some memory.
        # One engine per H200: Llama-2-70B in FP8 (about 70 GB) fits in its 141 GB, so
        # `pytest -n 8` runs a whole HGX box. No default floor until a published
        # per-GPU figure is verified: floors come from the marker or your profile.
        Profile(
            name="h200",
            description="H200 GPU (141 GB), FP8 TensorRT-LLM, one engine per GPU",
            backend="trtllm",
            device_kind="gpu",
            devices=1,
            precision="fp8",
            gpu_name="H200",
            min_memory_gib=130,
            compute_capability=(9, 0),
            **_LLAMA2_70B,
        ),
        Profile(
            name="h100-sxm",
            description="ND H100 v5 class node, 8 H100 GPUs, FP8 TensorRT-LLM",
            backend="trtllm",
            device_kind="gpu",
            devices=8,
            precision="fp8",
            floors={"per_gpu": 3_000.0},
            gpu_name=r"H100.*(SXM|HBM3)",
            min_memory_gib=70,
            compute_capability=(9, 0),
            tensor_parallel_size=8,
            **_LLAMA2_70B,
        ),
        # rack_floor = 72 GPUs x the per-GPU floor: 864,000 (GB200, published about
        # 865,000) and 1,094,400 (GB300, published 1,100,948)
        Profile(
            name="gb200-nvl72",
            description="GB200 NVL72 rack node, 4 GPUs, NVFP4 TensorRT-LLM",
            backend="trtllm",
            device_kind="gpu",
            devices=4,
            precision="nvfp4",
            floors={"per_gpu": 12_000.0},
            gpu_name="GB200",
            min_memory_gib=160,
            compute_capability=(10, 0),
            nodes=18,
            tensor_parallel_size=4,
            rack_floor=18 * 4 * 12_000.0,
            **_LLAMA2_70B,
        ),
        Profile(
            name="gb300-nvl72",
            description="GB300 NVL72 rack node, 4 GPUs, NVFP4 TensorRT-LLM",
            backend="trtllm",
            device_kind="gpu",
            devices=4,
            precision="nvfp4",
            floors={"per_gpu": 15_200.0},
            gpu_name="GB300",
            min_memory_gib=250,
            compute_capability=(10, 3),
            nodes=18,
            tensor_parallel_size=4,
            rack_floor=18 * 4 * 15_200.0,
            **_LLAMA2_70B,
        ),
    )
}

# MLPerf's LLM benchmarks after Llama-2-70B on H200s (mlperf_models.py: the limits and
# sizes from LoadGen's mlperf.conf); no floors until a per-GPU figure is verified
for _name, (_model, _gpus, _precision) in mlperf_models.H200.items():
    BUILTIN[_name] = Profile(
        name=_name,
        description=f"MLPerf {_model} on {_gpus} x H200, {_precision} TensorRT-LLM",
        backend="trtllm",
        device_kind="gpu",
        devices=_gpus,
        precision=_precision,
        model=_model,
        requests=mlperf_models.SAMPLES[_model],
        max_tokens=mlperf_models.MAX_TOKENS[_model],
        warmup=64,
        slos=mlperf_models.SLOS[_model],
        gpu_name="H200",
        min_memory_gib=130,
        compute_capability=(9, 0),
        tensor_parallel_size=_gpus,
        min_duration_s=600.0,
    )


# --- user profiles -----------------------------------------------------------------


class _Bad(Exception):
    """A bad value; `load_user` adds the file, profile and key."""


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(f"expected a non-empty string, got {value!r}")
    return value


def _int(value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Bad(f"expected an integer >= {minimum}, got {value!r}")
    return value


def _float(value: object, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"expected a number, got {value!r}")
    number = finite(value)  # TOML has nan and inf
    if number is None or number < minimum or (strict and number == minimum):
        raise _Bad(f"expected a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return number


def _fraction(value: object) -> float:
    number = _float(value, 0, strict=False)
    if number >= 1:
        raise _Bad(f"expected a fraction from 0 up to 1, such as 0.1, got {value!r}")
    return number


def _choice(value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _Bad(f"expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _pattern(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a regular expression string, got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise _Bad(f"not a regular expression ({exc}): {value!r}") from None
    return value


def _numbers(value: object, keys: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _Bad(f"expected a table of {', '.join(keys)}, got {value!r}")
    out: dict[str, float] = {}
    for key, number in value.items():
        if key not in keys:
            raise _Bad(f"unknown key {key!r}; allowed: {', '.join(keys)}")
        try:
            out[key] = _float(number, 0, strict=True)
        except _Bad as exc:
            raise _Bad(f"{key}: {exc}") from None
    return out


def _slos(value: object) -> dict[str, dict[str, float]]:
    """`{ server = { ttft_p99_ms = 1500 } }`: per scenario, latency_slo limits in ms."""
    if not isinstance(value, dict):
        raise _Bad(
            f"expected a table of scenarios ({', '.join(SLO_SCENARIOS)}), each a table of "
            f"latency_slo limits in ms, got {value!r}"
        )
    out: dict[str, dict[str, float]] = {}
    for scenario, limits in value.items():
        if scenario not in SLO_SCENARIOS:
            raise _Bad(f"unknown scenario {scenario!r}; allowed: {', '.join(SLO_SCENARIOS)}")
        try:
            out[scenario] = _numbers(limits, SLO_KEYWORDS)
        except _Bad as exc:
            raise _Bad(f"{scenario}: {exc}") from None
    return out


def _capability(value: object) -> tuple[int, int]:
    """ "10.3" (or 10.3) -> (10, 3)."""
    match = re.fullmatch(r"(\d+)\.(\d+)", str(value))
    if isinstance(value, bool) or match is None or int(match[1]) < 1:  # CUDA's start at 1.0
        raise _Bad(f'expected "MAJOR.MINOR" such as "10.3", got {value!r}')
    return int(match[1]), int(match[2])


def _table(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"expected a table, got {value!r}")
    return dict(value)


# TOML key -> parser of its value; every key a user may set
KEYS: dict[str, Any] = {
    "description": _str,
    "backend": lambda v: _choice(v, BACKEND_NAMES),
    "device_kind": lambda v: _choice(v, ("cpu", "gpu")),
    "devices": lambda v: _int(v, 1),
    "precision": _str,
    "model": _str,
    "requests": lambda v: _int(v, 1),
    "max_tokens": lambda v: _int(v, 1),
    "warmup": lambda v: _int(v, 0),
    "floors": lambda v: _numbers(v, tuple(FLOOR_METRICS)),
    "engine": _table,
    "gpu_name": _pattern,
    "min_memory_gib": lambda v: _float(v, 0, strict=False),
    "nodes": lambda v: _int(v, 1),
    "tensor_parallel_size": lambda v: _int(v, 1),
    "rack_floor": lambda v: _float(v, 0, strict=True),
    "slos": _slos,
    "parity": lambda v: _numbers(v, PARITY_KEYS),
    "dataset": _str,
    "reference_precision": _str,
    "compute_capability": _capability,
    "reference_model": _str,
    "min_duration_s": lambda v: _float(v, 0, strict=False),
    "throttled": lambda v: _choice(v, ("note", "invalid")),
    "max_regression": _fraction,
}
MERGED = ("floors", "engine", "slos", "parity")  # tables merge key by key with `extends`
REQUIRED = tuple(
    f.name for f in fields(Profile) if f.default is MISSING and f.default_factory is MISSING
)


def _tables(rootdir: Path) -> list[tuple[str, dict[str, Any], Path]]:
    """(name, raw table, file) for every user profile, pyproject.toml first."""
    found: list[tuple[str, dict[str, Any], Path]] = []
    for filename, keys in (("pyproject.toml", ("tool", "tokperf", "profiles")),
                           ("tokperf.toml", ("profiles",))):  # fmt: skip
        path = rootdir / filename
        if not path.is_file():
            continue
        try:
            doc: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise pytest.UsageError(f"{path}: not valid TOML: {exc}") from None
        for depth, key in enumerate(keys, start=1):
            doc = doc.get(key, {})
            if not isinstance(doc, dict):  # e.g. `tool.tokperf = 1`: never ignored silently
                where = "[" + ".".join(keys[:depth]) + "]"
                what = "a table of profiles" if depth == len(keys) else "a table"
                raise pytest.UsageError(f"{path}: {where} must be {what}, got {doc!r}")
        for name, table in doc.items():
            if not isinstance(table, dict):
                raise pytest.UsageError(
                    f"{path}: profile {name!r}: expected a table [{'.'.join(keys)}.{name}]"
                )
            found.append((name, table, path))
    return found


def load_user(rootdir: Path, builtin: Mapping[str, Profile] = BUILTIN) -> dict[str, Profile]:
    """The built-in profiles plus the user's, every key validated.

    A user profile `extends` a built-in or an earlier user profile: its keys replace
    the parent's, and the tables (floors, engine, slos, parity) merge key by key
    (`slos` per scenario, then limit by limit).
    """
    raw = _tables(rootdir)
    seen: dict[str, Path] = {}
    for name, _, path in raw:
        if name in builtin:
            raise pytest.UsageError(
                f"{path}: profile {name!r} is a built-in profile; give yours another "
                f"name and `extends = {name!r}`"
            )
        if name in seen:
            raise pytest.UsageError(f"{path}: profile {name!r} is also defined in {seen[name]}")
        seen[name] = path
    registry = dict(builtin)
    for name, table, path in raw:
        registry[name] = _build(name, table, path, registry)
    return registry


def _build(
    name: str, table: Mapping[str, Any], path: Path, known: Mapping[str, Profile]
) -> Profile:
    def bad(key: str, why: str) -> pytest.UsageError:
        return pytest.UsageError(f"{path}: profile {name!r}: key {key!r}: {why}")

    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "extends":
            continue
        if key not in KEYS:
            raise bad(key, f"unknown key; allowed: extends, {', '.join(KEYS)}")
        try:
            values[key] = KEYS[key](value)
        except _Bad as exc:
            raise bad(key, str(exc)) from None
    parent_name = table.get("extends")
    if parent_name is None:
        missing = [k for k in REQUIRED if k not in values and k != "name"]
        if missing:
            raise pytest.UsageError(
                f"{path}: profile {name!r}: missing keys {', '.join(missing)} "
                '(or give `extends = "PROFILE"` to start from another profile)'
            )
        return Profile(name=name, defined_in=str(path), **values)
    if not isinstance(parent_name, str) or parent_name not in known:
        raise bad(
            "extends",
            f"{parent_name!r} is no profile defined before it; known: {', '.join(known)}",
        )
    parent = known[parent_name]
    for key in MERGED:
        if key in values:
            values[key] = {**getattr(parent, key), **values[key]}
    if "slos" in values:  # and within a scenario, limit by limit
        values["slos"] = {
            scenario: {**parent.slos.get(scenario, {}), **limits}
            for scenario, limits in values["slos"].items()
        }
        values["slos"] = {**parent.slos, **values["slos"]}
    description = values.pop("description", f"{parent.description} (extended)")
    return replace(parent, name=name, description=description, defined_in=str(path), **values)


# --- selection ---------------------------------------------------------------------


class Unmatched(Exception):
    """NVML sees GPUs and no GPU profile matches them: never a silent cpu fallback
    (the plugin makes it a usage error once a test uses tokperf)."""


def detect(registry: Mapping[str, Profile], inventory: Inventory) -> tuple[Profile, str]:
    """The first GPU profile (user profiles first) the inventory has enough GPUs for.

    No GPUs: the cpu profile. GPUs that no profile matches raise `Unmatched`.
    """
    cpu = registry[DEFAULT_PROFILE]
    if not inventory.gpus:
        return cpu, "default"
    ordered = sorted(registry.values(), key=lambda p: p.defined_in == "built-in")
    for profile in ordered:
        if profile.device_kind != "gpu":
            continue
        need = profile.need()
        # busy or MIG GPUs still say which machine this is; allocation judges them later
        matching = [g for g in inventory.gpus if unsuitable(g, need, allow_busy=True) in
                    (None, "MIG mode is enabled")]  # fmt: skip
        if len(matching) >= need.count:
            return profile, f"detected: {len(matching)} x {matching[0].name}"
    raise Unmatched(unmatched_message(inventory))


def unmatched_message(inventory: Inventory) -> str:
    """What the GPUs are, and a profile for them to paste into pyproject.toml."""
    gpu = inventory.gpus[0]
    same = [g for g in inventory.gpus if g.name == gpu.name]
    cc = gpu.compute_capability
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-")
    capability = f'compute_capability = "{cc[0]}.{cc[1]}"\n' if cc else ""
    pattern = re.sub(r"([][.^$*+?{}|()\\])", r"\\\1", gpu.name)  # a literal regex, TOML '...'
    return (
        f"no tokperf GPU profile matches this machine's GPUs: {inventory.describe()}; "
        f"GPU 0 is {gpu.name!r}, {gpu.memory_gib:.0f} GiB"
        + (f", compute capability {cc[0]}.{cc[1]}" if cc else "")
        + ". tokperf does not fall back to the cpu profile while NVML sees GPUs: name a "
        "profile with --tokperf-profile (cpu runs the embedded engine on the CPU), or add "
        "one to pyproject.toml, for example:\n\n"
        f"[tool.tokperf.profiles.{slug}]\n"
        'extends = "h200"                    # TensorRT-LLM in FP8, no default floor\n'
        f'description = "{len(same)} x {gpu.name}"\n'
        f"gpu_name = '{pattern}'\n"
        f"min_memory_gib = {int(gpu.memory_gib * 0.9)}\n"
        f"{capability}"
        "devices = 1                         # GPUs per engine (with tensor_parallel_size)\n"
        "# floors = { per_gpu = 1000.0 }     # output tokens/s per GPU it must reach\n"
    )


def select(
    option: str | None,
    ini: str,
    inifile: str | None,
    registry: Mapping[str, Profile] = BUILTIN,
    inventory: Inventory | None = None,
) -> tuple[Profile, str]:
    """The active profile and where its name came from.

    Precedence: command line > environment > ini > detected from the inventory >
    default. Whether the profile's engine ships is checked when the engine loads,
    after GPUs were allocated: a GPU profile on a machine without its GPUs skips.
    """
    env = os.environ.get(ENV_PROFILE)
    if option:
        name, source = option, "--tokperf-profile"
    elif env:
        name, source = env, f"environment variable {ENV_PROFILE}"
    elif ini:
        name, source = ini, f"ini option tokperf_profile in {inifile or 'the ini file'}"
    elif inventory is not None:
        return detect(registry, inventory)
    else:
        name, source = DEFAULT_PROFILE, "default"
    if name not in registry:
        raise pytest.UsageError(
            f"unknown tokperf profile {name!r} (from {source}); "
            f"available: {', '.join(sorted(registry))}"
        )
    return registry[name], source
