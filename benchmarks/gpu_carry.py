"""Make the folder the GPU-day call carries (`.gpuday/site`): what the lent machine lacks.

The lent GPU machine has PyTorch, transformers, aiohttp, uvloop and pytest, but not
llama-cpp-python (nor gguf, diskcache, orjson), and nothing can be installed there from
an index. This unpacks, into one folder that goes on PYTHONPATH there
(benchmarks/gpu_check.py --site, default .gpuday/site):

- `llama_cpp` from a wheel you built, with one copy of each shared library it loads
  (the wheel holds three of each: name, soname, full version) and without libmtmd
  (multimodal, loaded only on use); plus this machine's libgomp.so.1 beside them, in
  case the lent machine has none. Build it with AMX code, so the AMX crash can show on
  an AMX CPU, and for AVX-512 (Sapphire Rapids and later; Zen 4 runs it without AMX):

      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \\
        -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \\
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=ON \\
        -DGGML_AMX_INT8=ON -DGGML_AMX_BF16=ON" \\
        pip wheel --no-deps --no-binary llama-cpp-python -w /tmp/amx llama-cpp-python==0.3.36

  (about 6 minutes on 2 cores; a CPU without AVX-512 cannot run it: the GPU day then
  records the embedded step's crash, not a stop);
- gguf, diskcache and orjson for CPython 3.12 on x86-64 (`pip download`).

    python benchmarks/gpu_carry.py /tmp/amx/llama_cpp_python-0.3.36-*.whl [--dest .gpuday/site]

About 15 MB; the device tool carries at most 64 MiB with a call (`carry: [".gpuday"]`).
"""

from __future__ import annotations

import argparse
import ctypes.util
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURE = ("gguf", "diskcache", "orjson")
# the lent machine's Python (shared/FACTS.md: "The lent GPU machine")
PLATFORM = "--python-version 3.12 --implementation cp --only-binary=:all: --platform "
PLATFORM += "manylinux_2_17_x86_64 --platform manylinux2014_x86_64"


def wanted(name: str) -> bool:
    """A file of the llama_cpp package worth carrying."""
    if not name.startswith("llama_cpp/"):
        return False  # the wheel's top-level lib/, include/, bin/: not imported
    base = name.rsplit("/", 1)[-1]
    if base.startswith("libmtmd"):
        return False
    return re.search(r"\.so\.\d+\.\d+", base) is None  # keep lib*.so and lib*.so.0


def unpack_llama(wheel: Path, dest: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if wanted(n)]
        for name in names:
            z.extract(name, dest)
    return names


def add_gomp(lib: Path) -> str | None:
    """This machine's OpenMP runtime beside the libraries (found by their $ORIGIN)."""
    found = ctypes.util.find_library("gomp")
    if not found:
        return None
    for folder in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64"):
        path = Path(folder) / found
        if path.is_file():
            shutil.copy(path, lib / "libgomp.so.1")
            return str(path)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path, help="a llama-cpp-python wheel (built with AMX)")
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpuday" / "site")
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    names = unpack_llama(args.wheel, args.dest)
    gomp = add_gomp(args.dest / "llama_cpp" / "lib")
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *PLATFORM.split()]
        subprocess.run([*pip, "-d", tmp, *PURE], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(args.dest)
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    (args.dest / "CARRIED.txt").write_text(
        f"llama_cpp from {args.wheel.name} ({len(names)} files), libgomp from {gomp}\n"
        + "".join(f"{w.name}\n" for w in wheels)
    )
    print(f"{args.dest}: {size / 1e6:.1f} MB: {args.wheel.name}, {[w.name for w in wheels]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
