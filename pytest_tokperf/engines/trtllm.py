"""TensorRT-LLM in process, through its LLM API (PyTorch backend by default).

Written against tensorrt-llm 1.2.x: `tensorrt_llm.LLM`, `SamplingParams`,
`tensorrt_llm.llmapi.KvCacheConfig`, and `LLM.generate_async(prompt, params,
streaming=True)`, whose result is async iterable and whose `outputs[0]` carries
`token_ids_diff` / `text_diff` for each step. Each step becomes one chunk of
`len(token_ids_diff)` tokens: the engine may emit several tokens per step
(speculative decoding, stream intervals), and the count stays exact.

A run is made the way trtllm-bench makes the published numbers (NVIDIA/TensorRT-LLM,
`tensorrt_llm/bench/`):
KV-cache block reuse off (`enable_block_reuse`, default False here; the LLM API's
default is True) and `free_gpu_memory_fraction` 0.90; prompts tokenized once, before
the measured run, and sent as token ids; no detokenization on the throughput path
(`Request.detokenize`: accuracy runs still get text). The EOS policy is explicit:
`ignore_eos` (default False: EOS honoured, as MLPerf scores it; trtllm-bench's default
`--eos_id -1` is `ignore_eos = True`). All of it is recorded in `EngineInfo.settings`.
Per GPU divides by the world size, tensor x pipeline x context parallel.

NVFP4 weights need Blackwell (compute capability 10.x or newer: B200, GB200, GB300);
Hopper runs FP8. The precision is read from a ModelOpt checkpoint's
`hf_quant_config.json` or an engine directory's `config.json`
(`pretrained_config.quantization.quant_algo`); `MIXED_PRECISION` is resolved from
the per-layer algorithms (`quantized_layers`, in `quant_cfg.json` for engines), and
FP4 in any layer on an older GPU is refused before loading.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_tokperf.engines import Chunk, EngineError, EngineInfo, MissingExtraError, Request

SETTINGS = {
    "model",
    "tokenizer",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "context_parallel_size",
    "free_gpu_memory_fraction",
    "enable_block_reuse",
    "ignore_eos",
    "max_batch_size",
    "max_num_tokens",
    "engine_dir",
    "llm_args",
    "chat_template",
}
BLACKWELL = 10  # first compute-capability major version with FP4 tensor cores
# trtllm-bench's KV cache (tensorrt_llm/bench): no block reuse, 90% of free memory
FREE_GPU_MEMORY_FRACTION = 0.90
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise EngineError(f"{path}: expected a JSON object")
    return doc


def quant_precision(quant: Mapping[str, Any], folder: Path) -> str | None:
    """'nvfp4', 'fp8', ... from a quantization section; MIXED_PRECISION per layer.

    Mixed precision names every algorithm its layers use, e.g.
    'mixed_precision(fp8+nvfp4)', so an FP4 layer anywhere trips the Blackwell guard.
    """
    algo = quant.get("quant_algo")
    if not algo:
        return None
    if str(algo).upper() != "MIXED_PRECISION":
        return str(algo).lower()
    layers = quant.get("quantized_layers")
    if layers is None and (folder / "quant_cfg.json").is_file():
        layers = _json(folder / "quant_cfg.json").get("quantized_layers")
    if not isinstance(layers, dict) or not layers:
        raise EngineError(
            f"{folder} is MIXED_PRECISION but lists no per-layer algorithms "
            "(`quantized_layers` in quant_cfg.json): cannot tell whether it needs Blackwell"
        )
    algos = sorted({str(v.get("quant_algo")).lower() for v in layers.values()
                    if isinstance(v, dict) and v.get("quant_algo")})  # fmt: skip
    return f"mixed_precision({'+'.join(algos)})"


def checkpoint_precision(model: Path) -> str:
    """'nvfp4', 'fp8', ... from a ModelOpt `hf_quant_config.json`; else the HF dtype."""
    quant = model / "hf_quant_config.json"
    if quant.is_file():
        precision = quant_precision(_json(quant).get("quantization") or {}, model)
        if precision:
            return precision
    config = model / "config.json"
    if config.is_file():
        dtype = _json(config).get("torch_dtype") or _json(config).get("dtype")
        if dtype:
            return DTYPES.get(str(dtype), str(dtype))
    return "unknown"


def engine_precision(engine_dir: Path) -> str:
    """The precision of a TensorRT engine directory, from its `config.json`."""
    config = engine_dir / "config.json"
    if not config.is_file():
        raise EngineError(f"engine_dir {engine_dir} has no config.json: is it a TensorRT engine?")
    pretrained = _json(config).get("pretrained_config") or {}
    precision = quant_precision(pretrained.get("quantization") or {}, engine_dir)
    if precision:
        return precision
    dtype = pretrained.get("dtype")
    return DTYPES.get(str(dtype), str(dtype)) if dtype else "unknown"


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
    def __init__(
        self, llm: Any, sampling_params: Any, chat: bool, ignore_eos: bool, info: EngineInfo
    ) -> None:
        self._llm = llm
        self._SamplingParams = sampling_params
        self._chat = chat
        self._ignore_eos = ignore_eos
        self._token_ids: dict[str, list[int]] = {}  # prompt text -> its ids, made once
        self.info = info

    def prepare(self, prompts: Sequence[str]) -> None:
        """Tokenize a workload's prompts before its measured run (once per text)."""
        for prompt in prompts:
            self.token_ids(prompt)

    def token_ids(self, text: str) -> list[int]:
        ids = self._token_ids.get(text)
        if ids is None:
            tokenizer = self._llm.tokenizer
            if self._chat:
                # text first, then ids: `tokenize=True` returns a dict in transformers 5
                chat = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
                ids = list(tokenizer.encode(chat, add_special_tokens=False))
            else:
                ids = list(tokenizer.encode(text))
            self._token_ids[text] = ids
        return ids

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        # greedy, as MLPerf runs Llama-2-70B: top_k=1 is the LLM API's greedy path
        params = self._SamplingParams(
            max_tokens=request.max_tokens,
            top_k=1,
            ignore_eos=self._ignore_eos,
            detokenize=request.detokenize,
        )
        ids = self.token_ids(request.prompt)
        result = self._llm.generate_async(ids, sampling_params=params, streaming=True)
        async for step in result:
            out = step.outputs[0]
            new = list(out.token_ids_diff)
            if new:
                yield Chunk(len(new), out.text_diff if request.detokenize else "", tuple(new))

    async def aclose(self) -> None:
        self._llm.shutdown()


def _flag(settings: Mapping[str, Any], key: str, default: bool) -> bool:
    value = settings.get(key, default)
    if not isinstance(value, bool):
        raise EngineError(f"trtllm setting {key!r} must be true or false, got {value!r}")
    return value


def _size(settings: Mapping[str, Any], key: str, default: int) -> int:
    value = settings.get(key) or default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineError(f"trtllm setting {key!r} must be a positive integer, got {value!r}")
    return value


def load(settings: Mapping[str, Any], devices: int) -> TrtllmEngine:
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise EngineError(
            f"unknown trtllm engine settings {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(SETTINGS))}"
        )
    engine_dir = Path(str(settings["engine_dir"])) if settings.get("engine_dir") else None
    if not settings.get("model") and engine_dir is None:
        raise EngineError(
            "the trtllm engine needs 'model' (a checkpoint directory) or 'engine_dir' "
            "(a TensorRT engine directory)"
        )
    try:
        import tensorrt_llm
        from tensorrt_llm import SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("tensorrt_llm"):
            raise
        raise MissingExtraError("trtllm", "trtllm", "tensorrt_llm") from None
    model = Path(str(settings.get("model") or ""))
    if engine_dir is not None:
        if not engine_dir.is_dir():
            raise EngineError(f"trtllm engine_dir {engine_dir} is not a directory")
        path, precision = engine_dir, engine_precision(engine_dir)
    else:
        if not model.exists():
            raise EngineError(f"trtllm model {model} does not exist")
        path, precision = model, checkpoint_precision(model)
    pp = _size(settings, "pipeline_parallel_size", 1)
    cp = _size(settings, "context_parallel_size", 1)
    tp = _size(settings, "tensor_parallel_size", max(1, devices // (pp * cp)))
    if tp * pp * cp != devices:
        raise EngineError(
            f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} x context_parallel_size "
            f"{cp} != {devices} allocated GPUs; the per-GPU numbers would be wrong"
        )
    refuse_fp4_before_blackwell(precision, visible_gpus(devices))
    kwargs: dict[str, Any] = dict(settings.get("llm_args") or {})
    if "kv_cache_config" in kwargs:
        raise EngineError(
            "set the KV cache with the trtllm settings enable_block_reuse and "
            "free_gpu_memory_fraction, not llm_args.kv_cache_config (the result records them)"
        )
    block_reuse = _flag(settings, "enable_block_reuse", False)
    fraction = float(settings.get("free_gpu_memory_fraction") or FREE_GPU_MEMORY_FRACTION)
    kwargs["kv_cache_config"] = KvCacheConfig(
        enable_block_reuse=block_reuse, free_gpu_memory_fraction=fraction
    )
    if cp > 1:
        kwargs["context_parallel_size"] = cp
    for key in ("max_batch_size", "max_num_tokens"):
        if settings.get(key) is not None:
            kwargs[key] = int(settings[key])
    if settings.get("tokenizer"):
        kwargs["tokenizer"] = str(settings["tokenizer"])
    elif engine_dir is not None and model.is_dir():  # the checkpoint the engine came from
        kwargs["tokenizer"] = str(model)
    if engine_dir is not None:  # a prebuilt TensorRT engine instead of the PyTorch backend
        from tensorrt_llm._tensorrt_engine import LLM
    else:
        from tensorrt_llm import LLM
    try:
        llm = LLM(model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs)
    except Exception as exc:
        raise EngineError(f"TensorRT-LLM could not load {path}: {exc}") from exc
    ignore_eos = _flag(settings, "ignore_eos", False)
    chat = _flag(settings, "chat_template", True)
    info = EngineInfo(
        backend="trtllm",
        model=path.name,
        precision=precision,
        devices=devices,
        versions={"tensorrt-llm": str(getattr(tensorrt_llm, "__version__", "unknown"))},
        settings={
            "model": str(path),
            "engine_dir": str(engine_dir) if engine_dir is not None else None,
            "tensor_parallel_size": tp,
            "pipeline_parallel_size": pp,
            "context_parallel_size": cp,
            "world_size": tp * pp * cp,
            "enable_block_reuse": block_reuse,
            "free_gpu_memory_fraction": fraction,
            "ignore_eos": ignore_eos,
            "chat_template": chat,
            "prompts": "token ids, tokenized before the run",
            "detokenize": "accuracy runs only",
        }
        | {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))},
    )
    return TrtllmEngine(llm, SamplingParams, chat, ignore_eos, info)
