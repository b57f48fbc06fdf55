"""TensorRT-LLM in process, through its LLM API (PyTorch backend by default).

Written against tensorrt-llm 1.2.x: `tensorrt_llm.LLM`, `SamplingParams`,
`tensorrt_llm.llmapi.KvCacheConfig`, and `LLM.generate_async(prompt, params,
streaming=True)`, whose result is async iterable and whose `outputs[0]` carries
`token_ids_diff` / `text_diff` for each step. Each step becomes one chunk of
`len(token_ids_diff)` tokens: the engine may emit several tokens per step
(speculative decoding, stream intervals), and the count stays exact.

NVFP4 weights need Blackwell (compute capability 10.x or newer: B200, GB200, GB300);
Hopper runs FP8. The precision is read from a ModelOpt checkpoint's
`hf_quant_config.json`, and FP4 on an older GPU is refused before loading.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from pytest_tokperf.engines import Chunk, EngineError, EngineInfo, MissingExtraError, Request

SETTINGS = {
    "model",
    "tokenizer",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "free_gpu_memory_fraction",
    "max_batch_size",
    "max_num_tokens",
    "engine_dir",
    "llm_args",
    "chat_template",
}
BLACKWELL = 10  # first compute-capability major version with FP4 tensor cores


def checkpoint_precision(model: Path) -> str:
    """'nvfp4', 'fp8', ... from a ModelOpt `hf_quant_config.json`; else the HF dtype."""
    quant = model / "hf_quant_config.json"
    if quant.is_file():
        algo = json.loads(quant.read_text()).get("quantization", {}).get("quant_algo")
        if algo:
            return str(algo).lower()
    config = model / "config.json"
    if config.is_file():
        dtype = json.loads(config.read_text()).get("torch_dtype")
        if dtype:
            return {"bfloat16": "bf16", "float16": "fp16"}.get(str(dtype), str(dtype))
    return "unknown"


def visible_gpus(devices: int) -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of the GPUs this process may use, via NVML.

    NVML ignores CUDA_VISIBLE_DEVICES, so the allocation's UUIDs are looked up by UUID.
    """
    import pynvml

    pynvml.nvmlInit()
    try:
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
        if visible and all(v.startswith(("GPU-", "MIG-")) for v in visible):
            handles = [pynvml.nvmlDeviceGetHandleByUUID(v) for v in visible]
        else:
            indices = [int(v) for v in visible] if visible else range(devices)
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        out = []
        for h in handles:
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            out.append((name, (int(major), int(minor))))
        return out
    finally:
        pynvml.nvmlShutdown()


def refuse_fp4_before_blackwell(precision: str, gpus: list[tuple[str, tuple[int, int]]]) -> None:
    if "fp4" not in precision:
        return
    old = [(n, cc) for n, cc in gpus if cc[0] < BLACKWELL]
    if old:
        name, (major, minor) = old[0]
        raise EngineError(
            f"this checkpoint is {precision.upper()}, which needs a Blackwell GPU (compute "
            f"capability {BLACKWELL}.x: B200, GB200, GB300); the allocated {name} is "
            f"{major}.{minor}. Hopper (H100/H200) runs FP8: use an FP8 checkpoint there"
        )


class TrtllmEngine:
    def __init__(self, llm: Any, sampling_params: Any, chat: bool, info: EngineInfo) -> None:
        self._llm = llm
        self._SamplingParams = sampling_params
        self._chat = chat
        self.info = info

    def _prompt(self, text: str) -> str:
        if not self._chat:
            return text
        prompt: str = self._llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return prompt

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        # greedy, as MLPerf runs Llama-2-70B: top_k=1 is the LLM API's greedy path
        params = self._SamplingParams(max_tokens=request.max_tokens, top_k=1)
        result = self._llm.generate_async(self._prompt(request.prompt), params, streaming=True)
        async for step in result:
            out = step.outputs[0]
            new = list(out.token_ids_diff)
            if new:
                yield Chunk(len(new), out.text_diff, tuple(new))

    async def aclose(self) -> None:
        self._llm.shutdown()


def load(settings: Mapping[str, Any], devices: int) -> TrtllmEngine:
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise EngineError(
            f"unknown trtllm engine settings {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(SETTINGS))}"
        )
    if not settings.get("model"):
        raise EngineError("the trtllm engine needs 'model': a checkpoint or engine directory")
    try:
        import tensorrt_llm
        from tensorrt_llm import SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("tensorrt_llm"):
            raise
        raise MissingExtraError("trtllm", "trtllm", "tensorrt_llm") from None
    model = Path(str(settings["model"]))
    if not model.exists():
        raise EngineError(f"trtllm model {model} does not exist")
    precision = checkpoint_precision(model)
    tp = int(settings.get("tensor_parallel_size") or devices)
    pp = int(settings.get("pipeline_parallel_size") or 1)
    if tp * pp != devices:
        raise EngineError(
            f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} != {devices} allocated "
            "GPUs; the per-GPU numbers would be wrong"
        )
    refuse_fp4_before_blackwell(precision, visible_gpus(devices))
    kwargs: dict[str, Any] = dict(settings.get("llm_args") or {})
    if settings.get("free_gpu_memory_fraction") is not None:
        kwargs["kv_cache_config"] = KvCacheConfig(
            free_gpu_memory_fraction=float(settings["free_gpu_memory_fraction"])
        )
    for key in ("max_batch_size", "max_num_tokens"):
        if settings.get(key) is not None:
            kwargs[key] = int(settings[key])
    if settings.get("tokenizer"):
        kwargs["tokenizer"] = str(settings["tokenizer"])
    if settings.get("engine_dir"):  # a prebuilt TensorRT engine instead of the PyTorch backend
        from tensorrt_llm._tensorrt_engine import LLM
    else:
        from tensorrt_llm import LLM
    try:
        llm = LLM(model=str(model), tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs)
    except Exception as exc:
        raise EngineError(f"TensorRT-LLM could not load {model}: {exc}") from exc
    info = EngineInfo(
        backend="trtllm",
        model=model.name,
        precision=precision,
        devices=devices,
        versions={"tensorrt-llm": str(getattr(tensorrt_llm, "__version__", "unknown"))},
        settings={"model": str(model), "tensor_parallel_size": tp, "pipeline_parallel_size": pp}
        | {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))},
    )
    return TrtllmEngine(llm, SamplingParams, bool(settings.get("chat_template", True)), info)
