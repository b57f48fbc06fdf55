"""Precision variants of the embedded model, built once into the user cache directory.

The shipped SmolLM2-135M-Instruct file is Q4_1. The ladder is built from it: `f16` by
dequantizing every tensor with the `gguf` package and writing an F16 GGUF with the same
metadata (tokenizer, chat template), and `q8_0` / `q4_0` from that F16 file with
llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`).

Parallel xdist workers and interrupted runs must never see half a model: every
variant is built under a file lock, written to a temporary name and renamed into
place, so a file at the final path is always complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from pytest_tokperf.engines import EngineError, MissingExtraError

SHIPPED = "q4_1"
VARIANTS = ("q4_1", "f16", "q8_0", "q4_0")
ENV_CACHE = "TOKPERF_CACHE_DIR"
# the general.file_type of an F16 GGUF (llama.cpp's LLAMA_FTYPE_MOSTLY_F16)
FTYPE_F16 = 1


def cache_dir() -> Path:
    """Where built variants live: $TOKPERF_CACHE_DIR, else the user cache directory."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    try:
        import platformdirs
    except ModuleNotFoundError:  # the embedded extra brings it; a bare install falls back
        return Path.home() / ".cache" / "pytest-tokperf"
    return Path(platformdirs.user_cache_dir("pytest-tokperf", appauthor=False))


def _source_key(source: Path) -> str:
    """A short key of the source file, so a different source never reuses a build."""
    stat = source.stat()
    text = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _stem(source: Path) -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct."""
    stem, _, _suffix = source.stem.rpartition(".")
    return stem or source.stem


def variant_file(source: Path, precision: str, cache: Path | None = None) -> Path:
    """The path a variant of `source` has in the cache (built or not)."""
    folder = (cache or cache_dir()) / _source_key(source)
    # the precision suffix lets the engine name the model without it (llamacpp._model_name)
    return folder / f"{_stem(source)}.{precision.upper()}.gguf"


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build `target` once across processes: lock, build to a temporary name, rename."""
    if target.is_file():
        return target
    try:
        import filelock
    except ModuleNotFoundError:
        raise MissingExtraError("llamacpp", "embedded", "filelock") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(target) + ".lock"):
        if target.is_file():  # another process built it while this one waited
            return target
        # only the lock's holder writes a temporary file: any found now is a dead
        # builder's (killed mid-build), a partial model that would stay forever
        for stale in target.parent.iterdir():
            if stale.name.startswith(f".{target.name}.") and stale.name.endswith(".tmp"):
                stale.unlink(missing_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return target


def write_f16(source: Path, out: Path) -> None:
    """Dequantize every tensor of `source` and write them as F16 (1-D norms stay F32)."""
    try:
        import gguf
        import numpy as np
    except ModuleNotFoundError:
        raise MissingExtraError("llamacpp", "embedded", "gguf") from None
    reader = gguf.GGUFReader(source)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise EngineError(f"{source}: no general.architecture in the GGUF metadata")
    writer = gguf.GGUFWriter(out, arch=str(arch_field.contents()))
    for field in reader.fields.values():
        # the writer adds the architecture and the GGUF.* header fields itself
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(FTYPE_F16)
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)

    def converted(tensor: gguf.ReaderTensor) -> np.ndarray:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # llama.cpp keeps 1-D tensors (norms, biases) in F32 in its F16 files too
        return array.astype(np.float32 if array.ndim == 1 else np.float16)

    shapes = []
    for tensor in reader.tensors:
        # the shape without dequantizing: GGUF dims are reversed numpy dims
        shape = tuple(int(d) for d in reversed(tensor.shape))
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        writer.add_tensor_info(tensor.name, shape, dtype, nbytes)
        shapes.append(shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, shape in zip(reader.tensors, shapes, strict=True):
        array = converted(tensor)
        if array.shape != shape:
            raise EngineError(f"{source}: tensor {tensor.name} dequantized to {array.shape}")
        writer.write_tensor_data(array)
    writer.close()


def quantize(f16: Path, out: Path, precision: str) -> None:
    """llama.cpp's own quantizer: F16 -> q8_0 or q4_0."""
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise MissingExtraError("llamacpp", "embedded", "llama_cpp") from None
    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[precision]
    params.nthread = 1  # a second lock-holder's cores belong to the tests still running
    status = llama_cpp.llama_model_quantize(
        str(f16).encode(), str(out).encode(), ctypes.byref(params)
    )
    if status != 0 or not out.is_file():
        raise EngineError(f"llama.cpp could not quantize {f16} to {precision} (status {status})")


def model_for(precision: str, source: Path, cache: Path | None = None) -> Path:
    """The GGUF file of `source` at `precision`, built on first use.

    `source` is the shipped Q4_1 file: asking for q4_1 returns it unchanged.
    """
    if precision not in VARIANTS:
        raise EngineError(
            f"unknown precision {precision!r} for the embedded engine; "
            f"available: {', '.join(VARIANTS)}"
        )
    if precision == SHIPPED:
        return source
    f16 = _atomic_build(variant_file(source, "f16", cache), lambda tmp: write_f16(source, tmp))
    if precision == "f16":
        return f16
    return _atomic_build(
        variant_file(source, precision, cache), lambda tmp: quantize(f16, tmp, precision)
    )
