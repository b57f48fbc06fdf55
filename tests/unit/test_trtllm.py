"""The trtllm adapter against the TensorRT-LLM 1.2.x stand-in (tests/standins).

What this proves: the adapter calls the LLM API as documented (greedy sampling, tensor
parallel size from the allocated GPUs, KV cache settings, streamed token diffs), the
way trtllm-bench makes its numbers (block reuse off, token-id prompts tokenized before
the run, no detokenization when only counts matter, an explicit EOS policy), honours
`engine_dir`, divides by tp x pp x cp, and refuses FP4 (also one FP4 layer of a mixed
checkpoint) on pre-Blackwell GPUs. The stand-in rejects unknown keywords as the real
classes do. What it cannot prove: anything about real GPUs.
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

    # trtllm-bench's KV cache: no block reuse (the LLM API's default is on), 90% memory
    assert llm.args["kv_cache_config"].enable_block_reuse is False
    assert info.settings["enable_block_reuse"] is False and info.settings["ignore_eos"] is False
    assert info.settings["world_size"] == 4

    reqs = [Request(f"r{i}", f"prompt {i}", 16) for i in range(5)]
    records = driver.run(engine, reqs)
    for rec, (prompt, params) in zip(records, llm.requests, strict=True):
        assert rec.ok
        assert params.top_k == 1 and params._greedy_decoding and params.max_tokens == 16
        assert params.ignore_eos is False and params.detokenize is True
        # token ids of the chat-formatted prompt, BOS from the template's text only
        assert isinstance(prompt, list)
        text = llm.tokenizer.decode(prompt)
        assert text.startswith("<|user|>prompt ") and text.endswith("<|assistant|>")
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
        EngineError, match=r"size 8 x pipeline_parallel_size 1 x context_parallel_size 1 != 4"
    ):
        load_engine("trtllm", {"model": model, "tensor_parallel_size": 8}, devices=4)
    engine = load_engine(
        "trtllm",
        {
            "model": model,
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 2,
            "llm_args": {"enable_chunked_prefill": True},
        },
        devices=4,
    )
    assert engine.info.precision == "bf16"
    llm = standin["llmapi"].CREATED[-1]
    assert llm.args["enable_chunked_prefill"] is True and llm.world_size == 4


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


def engine_dir(tmp_path: Path, algo: str | None, layers: dict[str, str] | None = None) -> Path:
    """A TensorRT engine directory as trtllm-build writes it (config.json, quant_cfg.json)."""
    path = tmp_path / "engine-tp4"
    path.mkdir()
    quant = {"quant_algo": algo, "kv_cache_quant_algo": "FP8"} if algo else {}
    config = {"pretrained_config": {"dtype": "float16", "quantization": quant}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "rank0.engine").write_bytes(b"")
    if layers is not None:
        per_layer = {name: {"quant_algo": a} for name, a in layers.items()}
        (path / "quant_cfg.json").write_text(
            json.dumps({"quant_algo": algo, "quantized_layers": per_layer})
        )
    return path


def test_engine_dir_is_the_path_loaded_and_its_precision_guards_fp4(standin, tmp_path) -> None:
    ckpt = checkpoint(tmp_path, None)
    built = engine_dir(tmp_path, "NVFP4")
    gpus(standin["pynvml"], H100, 4)
    with pytest.raises(EngineError, match="NVFP4, which needs a Blackwell GPU"):
        load_engine("trtllm", {"model": str(ckpt), "engine_dir": str(built)}, devices=4)
    gpus(standin["pynvml"], GB300, 4)
    engine = load_engine("trtllm", {"model": str(ckpt), "engine_dir": str(built)}, devices=4)
    (llm,) = standin["llmapi"].CREATED
    assert type(llm).__module__ == "tensorrt_llm._tensorrt_engine"
    assert llm.model == str(built)  # the engine itself, not the checkpoint
    assert llm.args["tokenizer"] == str(ckpt)  # the checkpoint still gives the tokenizer
    assert (engine.info.precision, engine.info.model) == ("nvfp4", "engine-tp4")
    assert engine.info.settings["engine_dir"] == str(built)
    with pytest.raises(EngineError, match="is not a directory"):
        load_engine("trtllm", {"engine_dir": str(tmp_path / "nope")}, devices=4)


def test_an_engine_without_quantization_reports_its_dtype(standin, tmp_path) -> None:
    gpus(standin["pynvml"], H100, 1)
    engine = load_engine("trtllm", {"engine_dir": str(engine_dir(tmp_path, None))}, devices=1)
    assert engine.info.precision == "fp16"


@pytest.mark.parametrize("where", ["engine", "checkpoint"])
def test_mixed_precision_with_one_fp4_layer_is_refused_on_hopper(standin, tmp_path, where) -> None:
    gpus(standin["pynvml"], H100, 2)
    layers = {"transformer.layers.0.mlp.fc": "FP8", "transformer.layers.1.mlp.fc": "NVFP4"}
    if where == "engine":
        settings = {"engine_dir": str(engine_dir(tmp_path, "MIXED_PRECISION", layers))}
    else:
        ckpt = checkpoint(tmp_path, None)
        quant = {"quant_algo": "MIXED_PRECISION",
                 "quantized_layers": {k: {"quant_algo": v} for k, v in layers.items()}}  # fmt: skip
        (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
        settings = {"model": str(ckpt)}
    with pytest.raises(
        EngineError, match=r"MIXED_PRECISION\(FP8\+NVFP4\), which needs a Blackwell"
    ):
        load_engine("trtllm", settings, devices=2)
    assert standin["llmapi"].CREATED == []


def test_mixed_precision_without_fp4_runs_on_hopper_and_without_layers_errors(
    standin, tmp_path
) -> None:
    gpus(standin["pynvml"], H100, 1)
    layers = {"a": "FP8", "b": "W4A16_AWQ"}
    built = engine_dir(tmp_path, "MIXED_PRECISION", layers)
    engine = load_engine("trtllm", {"engine_dir": str(built)}, devices=1)
    assert engine.info.precision == "mixed_precision(fp8+w4a16_awq)"
    (built / "quant_cfg.json").unlink()
    with pytest.raises(EngineError, match="lists no per-layer algorithms"):
        load_engine("trtllm", {"engine_dir": str(built)}, devices=1)


def test_world_size_counts_context_parallelism(standin, tmp_path) -> None:
    gpus(standin["pynvml"], GB300, 4)
    model = str(checkpoint(tmp_path, None))
    with pytest.raises(EngineError, match=r"x context_parallel_size 2 != 4 allocated"):
        load_engine(
            "trtllm", {"model": model, "tensor_parallel_size": 4, "context_parallel_size": 2}, 4
        )
    engine = load_engine("trtllm", {"model": model, "context_parallel_size": 2}, devices=4)
    llm = standin["llmapi"].CREATED[-1]
    assert llm.args["tensor_parallel_size"] == 2 and llm.args["context_parallel_size"] == 2
    assert llm.world_size == 4 == engine.info.devices == engine.info.settings["world_size"]


def test_throughput_runs_send_token_ids_tokenized_before_the_run(standin, tmp_path) -> None:
    """The runner's path: prompts tokenized up front, no detokenization, EOS as set."""
    import dataclasses

    from pytest_tokperf.profiles import BUILTIN
    from pytest_tokperf.runner import Tokperf
    from pytest_tokperf.workloads import load as load_workload

    gpus(standin["pynvml"], GB300, 1)
    settings = {"model": str(checkpoint(tmp_path, None)), "ignore_eos": True}
    engine = load_engine("trtllm", settings, devices=1)
    (llm,) = standin["llmapi"].CREATED
    tokenizer = llm.tokenizer
    seen: list[int] = []  # how often the tokenizer had run when each request was sent
    generate_async = llm.generate_async

    def spy(*args, **kwargs):
        seen.append(tokenizer.calls)
        return generate_async(*args, **kwargs)

    llm.generate_async = spy
    profile = dataclasses.replace(BUILTIN["cpu"], requests=70, max_tokens=12, warmup=2)
    result = Tokperf(engine, profile).run(scenario="offline")
    distinct = len(load_workload(None).prompts)  # 64: each tokenized once, before the run
    assert seen == [distinct] * 72 and tokenizer.calls == distinct
    assert len(llm.requests) == 72
    for prompt, params in llm.requests:
        assert isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        assert params.detokenize is False and params.ignore_eos is True
    # ignore_eos: every request generates its full length, as trtllm-bench's default
    assert all(r.output_tokens == 12 and r.text == "" for r in result.records)
    assert engine.info.settings["ignore_eos"] is True


def test_block_reuse_may_be_turned_on_and_is_recorded(standin, tmp_path) -> None:
    gpus(standin["pynvml"], GB300, 1)
    settings = {
        "model": str(checkpoint(tmp_path, None)),
        "enable_block_reuse": True,
        "free_gpu_memory_fraction": 0.8,
    }
    engine = load_engine("trtllm", settings, devices=1)
    kv = standin["llmapi"].CREATED[-1].args["kv_cache_config"]
    assert (kv.enable_block_reuse, kv.free_gpu_memory_fraction) == (True, 0.8)
    assert engine.info.settings["enable_block_reuse"] is True
    assert engine.info.settings["free_gpu_memory_fraction"] == 0.8
    with pytest.raises(EngineError, match="must be true or false"):
        load_engine("trtllm", {**settings, "enable_block_reuse": "no"}, devices=1)
    with pytest.raises(EngineError, match=r"not llm_args\.kv_cache_config"):
        load_engine("trtllm", {**settings, "llm_args": {"kv_cache_config": {}}}, devices=1)


def test_the_standin_rejects_unknown_keywords_like_the_real_classes(standin, tmp_path) -> None:
    gpus(standin["pynvml"], GB300, 1)
    model = str(checkpoint(tmp_path, None))
    with pytest.raises(EngineError, match="tp_size: Extra inputs are not permitted"):
        load_engine("trtllm", {"model": model, "llm_args": {"tp_size": 1}}, devices=1)
    from tensorrt_llm import SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    with pytest.raises(TypeError):
        SamplingParams(16)  # keyword-only upstream
    with pytest.raises(TypeError):
        SamplingParams(max_new_tokens=16)
    with pytest.raises(TypeError):
        KvCacheConfig(block_reuse=False)
