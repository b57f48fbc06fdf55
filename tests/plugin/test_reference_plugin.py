"""Accuracy parity on trtllm: the profile's `reference_model` is the reference engine.

A recorded GB300 node and the TensorRT-LLM stand-in (tests/standins): what is
checked is the wiring, that the reference engine loads the reference checkpoint
(never the checkpoint under test), and that without one the test errors naming the
profile key. The stand-in's answers depend on the prompt only, so its parity passes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("rouge_score", reason="needs the 'embedded' extra")

TESTS = Path(__file__).parent.parent
RECORDING = TESTS / "data" / "nvml" / "gb300-node-4.json"
SUITE = """
import pytest

@pytest.mark.accuracy_parity()
def test_parity(tokperf):
    tokperf.accuracy(samples=8, max_tokens=4)  # 8: the fewest a parity verdict takes
"""


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, pytester: pytest.Pytester) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(TESTS / "standins"))
    for name in [m for m in sys.modules if m == "pynvml" or m.startswith("tensorrt_llm")]:
        monkeypatch.delitem(sys.modules, name)
    import pynvml
    import tensorrt_llm.llmapi

    # the adapter asks NVML about the allocated GPUs: the recorded node's
    uuids = [g["uuid"] for g in json.loads(RECORDING.read_text())["gpus"]]
    pynvml.GPUS[:] = [("NVIDIA GB300", uuid, (10, 3)) for uuid in uuids]
    monkeypatch.setenv("TOKPERF_NVML_RECORDING", str(RECORDING))
    monkeypatch.setenv("TOKPERF_LOCK_DIR", str(pytester.path / "locks"))
    monkeypatch.delenv("TOKPERF_PROFILE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield tensorrt_llm.llmapi
    for name in [m for m in sys.modules if m == "pynvml" or m.startswith("tensorrt_llm")]:
        del sys.modules[name]


def checkpoint(root: Path, name: str, algo: str) -> Path:
    model = root / name
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    quant = {"quantization": {"quant_algo": algo}}
    (model / "hf_quant_config.json").write_text(json.dumps(quant))
    return model


def test_trtllm_parity_loads_the_reference_model(
    pytester: pytest.Pytester, standin: ModuleType
) -> None:
    fp4 = checkpoint(pytester.path, "llama-fp4", "NVFP4")
    fp8 = checkpoint(pytester.path, "llama-fp8", "FP8")
    profile = (
        f'[profiles.mine]\nextends = "gb300-nvl72"\nmodel = "{fp4}"\nreference_precision = "fp8"\n'
    )
    pytester.makefile(".toml", tokperf=profile + f'reference_model = "{fp8}"\n')
    pytester.makepyfile(test_parity_trtllm=SUITE)
    args = ("-p", "no:cacheprovider", "--tokperf-json", "out.json")
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    created = [llm.model for llm in standin.CREATED]
    assert created == [str(fp4), str(fp8)]  # the engine under test, then its reference
    (parity,) = json.loads((pytester.path / "out.json").read_text())["tests"]
    assert (parity["precision"], parity["reference_precision"]) == ("nvfp4", "fp8")
    assert parity["reference_engine"]["precision"] == "fp8"
    assert parity["reference_engine"]["settings"]["tensor_parallel_size"] == 4

    # no reference_model: an error naming the key, and no second engine
    standin.CREATED.clear()
    pytester.makefile(".toml", tokperf=profile)
    result = pytester.runpytest(*args)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*no reference for accuracy parity: accuracy parity on the trtllm engine needs a "
            'reference checkpoint: set reference_model = "PATH" *'
        ]
    )
    assert [llm.model for llm in standin.CREATED] == [str(fp4)]
