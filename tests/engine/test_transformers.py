"""The transformers engine, for real, on the CPU: a tiny random-weight Llama and a saved folder.

No download anywhere: the model is built from a config (2 layers, hidden size 64,
vocabulary 1,024) with seeded random weights, and the folder test writes its own model
and a word-level tokenizer with `save_pretrained`. The decode loop with its KV cache
is checked against greedy decoding that recomputes the whole sequence every step.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the transformers extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

from pytest_tokperf.engines import (  # noqa: E402
    EngineError,
    LogitsEngine,
    MissingExtraError,
    PreparingEngine,
    Request,
    load_engine,
)
from pytest_tokperf.engines.transformers import PRESETS, ByteTokenizer  # noqa: E402


def collect(engine: Any, request: Request) -> tuple[list[int], str, list[int]]:
    """(token ids, text, tokens per chunk) of one streamed request."""

    async def go() -> tuple[list[int], str, list[int]]:
        ids: list[int] = []
        text = ""
        sizes = []
        async for chunk in engine.stream(request):
            ids += chunk.token_ids
            text += chunk.text
            sizes.append(chunk.tokens)
        return ids, text, sizes

    return asyncio.run(go())


def close(engine: Any) -> None:
    asyncio.run(engine.aclose())


def reference_greedy(prompt_ids: list[int], steps: int) -> list[int]:
    """The same seeded weights, decoded greedily by recomputing the whole sequence."""
    fields = dict(PRESETS["tiny"])
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@pytest.fixture(scope="module")
def tiny() -> Any:
    engine = load_engine("transformers", {"config": "tiny"}, devices=1)
    yield engine
    close(engine)


def test_the_kv_cache_loop_decodes_what_a_full_recompute_decodes(tiny) -> None:
    ids, text, sizes = collect(tiny, Request("a", "The capital of France is", 24))
    # streamed token by token, the text decoded once after the last (no token's time waits)
    assert sizes == [1] * 24 + [0]
    assert ids == reference_greedy(ByteTokenizer().encode("The capital of France is"), 24)
    assert text == ByteTokenizer().decode(ids)
    # greedy and seeded: the same answer again, and from a freshly built engine
    assert collect(tiny, Request("b", "The capital of France is", 24))[0] == ids


def test_random_weights_run_full_length_and_say_what_they_are(tiny) -> None:
    info = tiny.info
    assert (info.backend, info.precision, info.devices) == ("transformers", "fp32", 1)
    assert info.model == "tiny llama (random weights, 0.2M parameters)"
    assert set(info.versions) == {"torch", "transformers"}
    s = info.settings
    assert (s["device"], s["dtype"], s["random_weights"], s["ignore_eos"]) == (
        "cpu",
        "float32",
        True,
        True,
    )
    assert s["threads"] == 1 and s["tokenizer"] == "byte-level"
    # EOS of random weights means nothing: every request generates its full length
    for i in range(3):
        ids, text, _ = collect(tiny, Request(f"r{i}", f"prompt {i}", 40, detokenize=False))
        assert len(ids) == 40 and text == ""
    assert isinstance(tiny, PreparingEngine) and isinstance(tiny, LogitsEngine)


def test_logits_agree_with_the_streamed_tokens(tiny) -> None:
    ids, _, _ = collect(tiny, Request("a", "hello", 12))
    rows = tiny.logits("hello", ids)
    assert rows.shape == (12, 1024)
    assert rows.argmax(axis=1).tolist() == ids


def test_a_config_json_file_is_random_weights_too(tmp_path: Path) -> None:
    config = tmp_path / "small.json"
    config.write_text(json.dumps({**PRESETS["tiny"], "num_hidden_layers": 1}))
    engine = load_engine("transformers", {"model": str(config)}, devices=1)
    try:
        assert engine.info.model.startswith("small llama (random weights")
        assert engine.info.settings["random_weights"] is True
    finally:
        close(engine)


def save_folder(path: Path) -> list[str]:
    """A Llama folder with a word-level tokenizer, as `save_pretrained` writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(1021))]  # the whole vocabulary
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fields = dict(PRESETS["tiny"])
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    fast.save_pretrained(path)
    return words


def test_a_local_folder_loads_offline_and_honours_its_eos(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-llama"
    save_folder(folder)
    settings = {"model": str(folder), "ignore_eos": True}
    engine = load_engine("transformers", settings, devices=1)
    try:
        assert (engine.info.model, engine.info.settings["random_weights"]) == ("tiny-llama", False)
        full, _, _ = collect(engine, Request("a", "w1 w2 w3", 10))
    finally:
        close(engine)
    assert len(full) == 10
    # make the third greedy token the model's EOS: honouring EOS stops before it
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = full[2]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    engine = load_engine("transformers", {"model": str(folder)}, devices=1)
    try:
        assert engine.info.settings["ignore_eos"] is False
        ids, text, _ = collect(engine, Request("a", "w1 w2 w3", 10))
    finally:
        close(engine)
    assert ids == full[:2]
    assert text.split() == [f"w{i - 3}" for i in ids]  # the model's own tokenizer decoded


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({}, "needs 'model' (a local model folder) or 'config'"),
        ({"config": "tiny", "model": "x"}, "'model' or 'config', not both"),
        ({"config": "tiny", "n_ctx": 1}, "unknown transformers engine settings n_ctx"),
        ({"config": "huge"}, "neither a preset (tiny) nor a JSON file"),
        ({"config": {**PRESETS["tiny"], "vocab_size": 100}}, "vocab_size >= 259"),
        ({"config": "tiny", "dtype": "int3"}, "transformers dtype 'int3'"),
        ({"config": "tiny", "threads": 0}, "'threads' must be a positive integer"),
        ({"config": "tiny", "ignore_eos": "yes"}, "'ignore_eos' must be true or false"),
        ({"model": "/nonexistent/folder"}, "is not a folder"),
    ],
)
def test_bad_settings_are_clear_errors(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(EngineError) as info:
        load_engine("transformers", settings, devices=1)
    assert says in str(info.value)


def test_one_gpu_only() -> None:
    with pytest.raises(EngineError, match="runs on one GPU, not 2"):
        load_engine("transformers", {"config": "tiny", "device": "cuda"}, devices=2)


def test_without_torch_the_message_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'pytest-tokperf\[transformers\]'"):
        load_engine("transformers", {"config": "tiny"}, devices=1)
