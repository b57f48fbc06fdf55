"""A stand-in for nvidia-ml-py's `pynvml`: the calls the trtllm adapter makes, over a
GPU list the test sets (name, UUID, compute capability), as NVML reports them."""

from __future__ import annotations

GPUS: list[tuple[str, str, tuple[int, int]]] = []
LOOKED_UP: list[str] = []


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


def nvmlInit() -> None:
    if not GPUS:
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    LOOKED_UP.append(f"index:{index}")
    return index


def nvmlDeviceGetHandleByUUID(uuid: str) -> int:
    LOOKED_UP.append(f"uuid:{uuid}")
    return next(i for i, g in enumerate(GPUS) if g[1] == uuid)


def nvmlDeviceGetName(handle: int) -> str:
    return GPUS[handle][0]


def nvmlDeviceGetCudaComputeCapability(handle: int) -> tuple[int, int]:
    return GPUS[handle][2]
