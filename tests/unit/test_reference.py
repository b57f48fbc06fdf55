"""Which reference accuracy parity compares with, per backend: never the engine itself."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_tokperf import reference
from pytest_tokperf.accuracy import ParitySpec
from pytest_tokperf.profiles import BUILTIN

GB300 = BUILTIN["gb300-nvl72"]
TRT = {"model": "/ckpt/llama2-70b-nvfp4", "tensor_parallel_size": 4, "engine_dir": "/engines/fp4"}


def options(**values: str):
    return lambda name: values.get(name.removeprefix("tokperf_reference_"))


def test_trtllm_needs_the_profiles_reference_model() -> None:
    with pytest.raises(reference.Missing) as info:
        reference.plan("trtllm", TRT, GB300, "fp8", options())
    assert str(info.value) == (
        "accuracy parity on the trtllm engine needs a reference checkpoint: set "
        'reference_model = "PATH" (the higher-precision checkpoint, e.g. FP8 or BF16) in '
        "profile 'gb300-nvl72', e.g. in pyproject.toml under [tool.tokperf.profiles.NAME] "
        'with extends = "gb300-nvl72"'
    )
    mine = dataclasses.replace(GB300, reference_model="/ckpt/llama2-70b-fp8")
    plan = reference.plan("trtllm", TRT, mine, "fp8", options())
    # the reference checkpoint on the same GPUs; the test engine's build is not reused
    assert plan.settings == {"model": "/ckpt/llama2-70b-fp8", "tensor_parallel_size": 4}
    assert plan.server_cmd is None
    same = dataclasses.replace(GB300, reference_model=TRT["model"])
    with pytest.raises(reference.Missing, match="is the model under test"):
        reference.plan("trtllm", TRT, same, "fp8", options())


def test_openai_needs_a_reference_server_and_never_its_own() -> None:
    test = {"base_url": "http://a:8000", "model": "m", "tokenizer": "t.gguf", "extra_body": {}}
    with pytest.raises(reference.Missing, match="set --tokperf-reference-base-url"):
        reference.plan("openai", test, GB300, "f16", options(), "http://a:8000")
    plan = reference.plan("openai", test, GB300, "f16", options(base_url="http://b:8000/v1"))
    assert plan.settings == {"base_url": "http://b:8000/v1", "tokenizer": "t.gguf",
                             "extra_body": {}, "precision": "f16"}  # fmt: skip
    for url in ("http://a:8000/", "http://a:8000/v1"):
        with pytest.raises(reference.Missing, match="is the server under test"):
            reference.plan("openai", test, GB300, "f16", options(base_url=url), "http://a:8000")
    # another model on the same server is a real reference
    other = options(base_url="http://a:8000", served_model="m-fp16")
    assert (
        reference.plan("openai", test, GB300, "f16", other, "http://a:8000").settings["model"]
        == "m-fp16"
    )
    launched = reference.plan("openai", test, GB300, "f16", options(server_cmd="serve {port}"))
    assert launched.server_cmd == "serve {port}" and "base_url" not in launched.settings


def test_llamacpp_builds_the_reference_precision_and_sim_has_none() -> None:
    plan = reference.plan("llamacpp", {"precision": "q4_0"}, BUILTIN["cpu"], "f16", options())
    assert plan.settings == {"precision": "f16"}
    with pytest.raises(reference.Missing, match="the sim engine has no model"):
        reference.plan("sim", {}, BUILTIN["sim"], "f16", options())


def test_the_profiles_parity_table_sets_the_default_limits() -> None:
    assert reference.defaults(BUILTIN["cpu"]) == ParitySpec()
    high = dataclasses.replace(GB300, parity={**GB300.parity, "rouge_fraction": 0.999})
    spec = reference.defaults(high)
    assert spec.rouge_ratio == 0.999 and spec.tokens_per_sample == (0.9, 1.1)


def test_a_high_accuracy_profile_gates_parity_at_99_9_percent(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".toml", tokperf='[profiles.ha]\nextends = "cpu"\nparity = { rouge_fraction = 0.999 }'
    )
    pytester.makepyfile(
        """
        import pytest

        def test_unmarked(tokperf):
            assert tokperf.parity_spec.rouge_ratio == 0.999

        @pytest.mark.accuracy_parity(reference="q8_0")
        def test_marked(tokperf):
            assert tokperf.parity_spec.rouge_ratio == 0.999
            pytest.skip("checked the limits only")

        @pytest.mark.accuracy_parity(reference="q8_0", rouge_ratio=0.95)
        def test_marker_wins(tokperf):
            assert tokperf.parity_spec.rouge_ratio == 0.95
            pytest.skip("checked the limits only")
        """
    )
    pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")
    result = pytester.runpytest("-p", "no:cacheprovider", "--tokperf-profile", "ha")
    result.assert_outcomes(passed=1, skipped=2)
