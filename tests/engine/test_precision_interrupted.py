"""A precision build killed half-way: no half model is ever used, the next run rebuilds.

The real F16 build of the shipped SmolLM2 file (the `gguf` dequantizer, a few
seconds) runs in a child process, which is killed with SIGKILL once its temporary
file has grown; then this process asks for the same variant.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_tokperf.engines import precision

gguf = pytest.importorskip("gguf", reason="needs the 'embedded' extra")
pytest.importorskip("filelock", reason="needs the 'embedded' extra")
llamacpp = pytest.importorskip("pytest_tokperf.engines.llamacpp")

BUILD = """
import sys
from pathlib import Path
from pytest_tokperf.engines import precision

precision.model_for("f16", Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_a_build_killed_midway_leaves_nothing_half_built(tmp_path: Path) -> None:
    try:
        source = llamacpp.shipped_model_path()
    except Exception as exc:  # the model package is missing: say which
        pytest.skip(f"needs the shipped model (the 'embedded' extra): {exc}")
    cache = tmp_path / "cache"
    target = precision.variant_file(source, "f16", cache)
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(source), str(cache)], stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300

    def partial() -> list[Path]:
        return list(target.parent.glob(".*.tmp")) if target.parent.exists() else []

    while not any(p.stat().st_size > 1_000_000 for p in partial()):
        assert builder.poll() is None, builder.communicate()[1]
        assert time.monotonic() < deadline, "the build wrote nothing in 300 s"
        time.sleep(0.01)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    (left,) = partial()  # the dead builder's temporary file, never renamed into place
    assert not target.exists()
    t0 = time.perf_counter()
    built = precision.model_for("f16", source, cache)  # the next run: the lock is free
    took = time.perf_counter() - t0
    assert built == target and not left.exists() and partial() == []
    # the rebuilt file is whole: every tensor of the source, readable
    reader = gguf.GGUFReader(built)
    assert len(reader.tensors) == len(gguf.GGUFReader(source).tensors)
    print(f"\nFAULT precision build killed: rebuilt f16 in {took:.2f} s")
