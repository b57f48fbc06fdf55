"""The trtllm adapter against the TensorRT-LLM 1.2.x stand-in (tests/standins).

What this proves: the adapter calls the LLM API as documented (greedy sampling, tensor
parallel size from the allocated GPUs, KV cache settings, streamed token diffs) and
refuses FP4 on pre-Blackwell GPUs. What it cannot prove: anything about real GPUs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from pytest_tokperf import driver
from pytest_tokperf.engines import EngineError, MissingExtraError, Request, load_engine

STANDINS = Path(__file__).parent.parent / "standins"
H100 = ("NVIDIA H100 80GB HBM3", "GPU-h100-{}", (9, 0))
GB300 = ("NVIDIA GB300", "GPU-gb300-{}", (10, 3))


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    monkeypatch.syspath_prepend(str(STANDINS))
    for name in [m for m in sys.modules if m == "pynvml" or m.startswith("tensorrt_llm")]:
        monkeypatch.delitem(sys.modules, name)
    import pynvml
    import tensorrt_llm.llmapi

    yield {"pynvml": pynvml, "llmapi": tensorrt_llm.llmapi}
    for name in [m for m in sys.modules if m == "pynvml" or m.startswith("tensorrt_llm")]:
        del sys.modules[name]


def gpus(nvml: ModuleType, kind: tuple[str, str, tuple[int, int]], count: int) -> None:
    nvml.GPUS[:] = [(kind[0], kind[1].format(i), kind[2]) for i in range(count)]


def checkpoint(tmp_path: Path, algo: str | None) -> Path:
    model = tmp_path / "llama2-70b-ckpt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    if algo:
        quant = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": algo}}
        (model / "hf_quant_config.json").write_text(json.dumps(quant))
    return model


def test_nvfp4_on_gb300_streams_greedy_with_tp_from_the_allocation(standin, tmp_path) -> None:
    gpus(standin["pynvml"], GB300, 4)
    engine = load_engine(
        "trtllm",
        {"model": str(checkpoint(tmp_path, "NVFP4")), "free_gpu_memory_fraction": 0.9},
        devices=4,
    )
    (llm,) = standin["llmapi"].CREATED
    assert llm.args["tensor_parallel_size"] == 4 and llm.args["pipeline_parallel_size"] == 1
    assert llm.args["kv_cache_config"].free_gpu_memory_fraction == 0.9
    info = engine.info
    assert (info.backend, info.precision, info.devices) == ("trtllm", "nvfp4", 4)
    assert info.versions["tensorrt-llm"] == "1.2.0rc0+standin"

    reqs = [Request(f"r{i}", f"prompt {i}", 16) for i in range(5)]
    records = driver.run(engine, reqs)
    for rec, (prompt, params) in zip(records, llm.requests, strict=True):
        assert rec.ok
        assert params.top_k == 1 and params._greedy_decoding and params.max_tokens == 16
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
        # every token the engine produced is counted, also when a step brings two
        expected = standin["llmapi"].RequestOutput(prompt, params)._planned
        assert rec.output_tokens == expected <= 16
        assert 2 in rec.chunk_tokens or expected < 3
        assert rec.text.count(" t") == rec.output_tokens
    import asyncio

    asyncio.run(engine.aclose())
    assert llm.is_shutdown


def test_fp4_is_refused_on_hopper_before_loading(standin, tmp_path) -> None:
    gpus(standin["pynvml"], H100, 8)
    with pytest.raises(EngineError) as info:
        load_engine("trtllm", {"model": str(checkpoint(tmp_path, "NVFP4"))}, devices=8)
    message = str(info.value)
    assert "NVFP4, which needs a Blackwell GPU" in message
    assert "NVIDIA H100 80GB HBM3 is 9.0" in message and "use an FP8 checkpoint" in message
    assert standin["llmapi"].CREATED == []  # refused before anything loaded


def test_fp8_runs_on_hopper_and_gpus_are_found_by_uuid(
    standin, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(standin["pynvml"], H100, 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-h100-6,GPU-h100-7")
    engine = load_engine("trtllm", {"model": str(checkpoint(tmp_path, "FP8"))}, devices=2)
    assert engine.info.precision == "fp8"
    # NVML ignores CUDA_VISIBLE_DEVICES: the adapter must look the allocated UUIDs up
    assert standin["pynvml"].LOOKED_UP == ["uuid:GPU-h100-6", "uuid:GPU-h100-7"]
    assert standin["llmapi"].CREATED[0].args["tensor_parallel_size"] == 2


def test_parallelism_must_match_the_allocation(standin, tmp_path) -> None:
    gpus(standin["pynvml"], GB300, 4)
    model = str(checkpoint(tmp_path, None))
    with pytest.raises(
        EngineError, match=r"tensor_parallel_size 8 x pipeline_parallel_size 1 != 4"
    ):
        load_engine("trtllm", {"model": model, "tensor_parallel_size": 8}, devices=4)
    engine = load_engine(
        "trtllm",
        {
            "model": model,
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 2,
            "engine_dir": True,
            "llm_args": {"enable_chunked_prefill": True},
        },
        devices=4,
    )
    assert engine.info.precision == "bf16"
    llm = standin["llmapi"].CREATED[-1]
    assert type(llm).__module__ == "tensorrt_llm._tensorrt_engine"
    assert llm.args["enable_chunked_prefill"] is True


def test_settings_and_a_missing_package_are_clear_errors(standin, tmp_path) -> None:
    with pytest.raises(EngineError, match="needs 'model'"):
        load_engine("trtllm", {}, devices=1)
    with pytest.raises(EngineError, match="unknown trtllm engine settings tp; allowed"):
        load_engine("trtllm", {"model": "x", "tp": 2}, devices=1)
    with pytest.raises(EngineError, match="does not exist"):
        load_engine("trtllm", {"model": str(tmp_path / "nope")}, devices=1)


def test_without_tensorrt_llm_the_message_names_the_extra(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'pytest-tokperf\[trtllm\]'"):
        load_engine("trtllm", {"model": str(tmp_path)}, devices=1)
