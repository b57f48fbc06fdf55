"""The GPU path, for real, on one CUDA machine: a script to run where a GPU is lent.

What it does, in order, printing each step and writing everything to OUT/gpu_check.json:

1. versions: Python, torch (+ CUDA), transformers, nvidia-ml-py; what CUDA sees.
2. inventory: the plugin's NVML reading of every GPU (`gpus.read_inventory`), and the
   report header of a collection with no profile named (which profile is detected).
3. two processes allocating one GPU: two pytest processes start together, each
   asking the `gpu-check` profile for one GPU and holding it a few seconds; on a
   one-GPU machine one of them runs on it and the other is told the GPU is taken.
4. the example suite (examples/, copied; every limit keyed "cpu" is given to the
   `gpu-check` profile too) on a random-weight Llama-architecture model sized to the
   GPU (Llama-2-13B shape on 100 GiB or more, 7B on 48 GiB, a 1.1B TinyLlama shape
   below), through the transformers engine in bf16 on the allocated GPU, with NVML
   telemetry during each run: tokens/s per GPU, J/token, power, clocks.

Nothing is downloaded: the model is built from its config with seeded random weights
(its text is noise; its speed is a real bf16 Llama forward pass). Rehearse the flow
on a machine without a GPU with a recorded one-GPU inventory and the tiny preset on
the CPU (telemetry then comes from the recording):

    python benchmarks/gpu_check.py --out /tmp/gpu-check            # on the GPU machine
    python benchmarks/gpu_check.py --rehearse --out /tmp/rehearsal  # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECORDING = ROOT / "tests" / "data" / "nvml" / "h100-sxm-8.json"
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


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    start = time.monotonic()
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return {
        "cmd": " ".join(cmd),
        "rc": done.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "stdout": done.stdout[-12000:],
        "stderr": done.stderr[-4000:],
    }


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("torch", "transformers", "pynvml", "pytest", "aiohttp", "mpi4py"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "present")
        except ImportError as exc:
            out[name] = f"missing ({exc})"
    try:
        import torch

        out["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out["cuda"] = torch.version.cuda
            out["device"] = {
                "name": props.name,
                "memory_gib": props.total_memory / 2**30,
                "capability": f"{props.major}.{props.minor}",
                "sms": props.multi_processor_count,
            }
    except ImportError:
        pass
    return out


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="no GPU: a recorded one-GPU inventory, the tiny model on the CPU",
    )
    parser.add_argument("--model", choices=sorted(LLAMA), help="shape instead of by memory")
    parser.add_argument("--requests", type=int, default=16, help="the profile's run size")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=480.0, help="seconds for the suite")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    work = out / "work"
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TOKPERF_PROFILE", None)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    section("versions")
    report["versions"] = versions()
    print(json.dumps(report["versions"], indent=2))

    section("inventory (NVML, as the plugin reads it)")
    if args.rehearse:
        recording = json.loads(RECORDING.read_text())
        recording["gpus"] = recording["gpus"][:1]  # one GPU, as on the lent machine
        (work / "one-gpu.json").write_text(json.dumps(recording))
        env["TOKPERF_NVML_RECORDING"] = str(work / "one-gpu.json")
        os.environ["TOKPERF_NVML_RECORDING"] = env["TOKPERF_NVML_RECORDING"]
    sys.path.insert(0, str(ROOT))
    from pytest_tokperf import gpus
    from pytest_tokperf.engines.transformers import PRESETS

    inventory = gpus.read_inventory(*gpus.load_nvml())
    report["inventory"] = inventory.to_json()
    print(inventory.describe())
    print(json.dumps(report["inventory"], indent=2, default=str)[:4000])
    if not inventory.gpus:
        print("no GPU seen by NVML: nothing more to check here (try --rehearse)")
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        return 2
    shutil.copytree(ROOT / "examples", work / "examples")
    detect = run(
        [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", "examples"],
        work,
        env,
        120,
    )
    report["detected"] = detect
    print("\n".join(line for line in detect["stdout"].splitlines() if "tokperf:" in line))
    print(detect["stderr"][-2000:])

    section("model")
    memory = inventory.gpus[0].memory_gib
    if args.rehearse:
        name, config, dtype, device = "tiny", dict(PRESETS["tiny"]), "fp32", "cpu"
    else:
        name = args.model or pick_model(memory)
        config = {"model_type": "llama", "max_position_embeddings": 4096, **LLAMA[name][2]}
        dtype, device = "bf16", "cuda"
    (work / f"{name}.json").write_text(json.dumps(config))
    report["model"] = {"name": name, "config": config, "dtype": dtype, "gpu_memory_gib": memory}
    print(json.dumps(report["model"]))
    (work / "tokperf.toml").write_text(
        PROFILE.format(
            dtype=dtype,
            model=name,
            config=work / f"{name}.json",
            device=device,
            requests=args.requests,
            max_tokens=args.max_tokens,
        )
    )
    common = [
        "-p",
        "no:cacheprovider",
        "--tokperf-profile",
        "gpu-check",
        "--tokperf-lock-dir",
        str(work / "locks"),
    ]

    section("two processes allocate the one GPU")
    (work / "hold").mkdir()
    (work / "hold" / "test_hold.py").write_text(HOLD)
    cmd = [sys.executable, "-m", "pytest", "hold", "-s", "-rs", *common]
    procs = [
        subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    report["two_processes"] = [
        {"rc": p.returncode, "stdout": o[-4000:]} for p, o in zip(procs, outputs, strict=True)
    ]
    for i, o in enumerate(outputs):
        held = [line for line in o.splitlines() if "HELD" in line or "SKIPPED" in line]
        print(f"process {i}: rc {procs[i].returncode}: {' | '.join(held) or o[-500:]}")

    section("the example suite on the GPU through transformers")
    report["patched_limits"] = patch_examples(work / "examples")
    print("limits given to gpu-check:", report["patched_limits"])
    suite = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "examples",
            "-rs",
            *common,
            "--tokperf-json",
            str(out / "examples.json"),
        ],
        work,
        env,
        args.timeout,
    )
    report["examples"] = suite
    print(suite["stdout"][-8000:])
    print(suite["stderr"][-2000:])
    if (out / "examples.json").is_file():
        doc = json.loads((out / "examples.json").read_text())
        rows = []
        for t in doc["tests"]:
            tele = (t.get("telemetry") or {}).get("gpu") or {}
            engine = t.get("engine") or {}
            keys = (
                "nodeid",
                "verdict",
                "requests",
                "output_tokens",
                "tokens_per_s",
                "tokens_per_s_per_gpu",
                "energy_j_per_token",
                "tokens_per_s_per_watt",
                "gpus",
            )
            device = (engine.get("settings") or {}).get("device_name")
            rows.append({k: t.get(k) for k in keys} | {"gpu": tele, "device": device})
        report["results"] = rows
        section("results")
        for row in rows:
            print(json.dumps(row, default=str))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten: {out / 'gpu_check.json'}")
    return 0 if suite["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
