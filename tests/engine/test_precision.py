"""Precision variants of the embedded model: built once, atomically, from the shipped file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_tokperf.engines import EngineError, LogitsEngine, Request, load_engine, precision
from pytest_tokperf.engines.llamacpp import LlamaCppEngine, shipped_model_path

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")
gguf = pytest.importorskip("gguf", reason="needs the 'embedded' extra")
np = pytest.importorskip("numpy")

RACER = """
import sys, time
from pathlib import Path
from pytest_tokperf.engines import precision

cache, log = Path(sys.argv[1]), Path(sys.argv[2])
real_f16, real_quantize = precision.write_f16, precision.quantize

def logged(name, build):
    def wrapper(*args):
        with log.open("a") as f:
            f.write(f"{name} start\\n")
        time.sleep(1.0)  # hold the lock long enough for the other process to queue up
        build(*args)
        with log.open("a") as f:
            f.write(f"{name} end\\n")
    return wrapper

precision.write_f16 = logged("f16", real_f16)
precision.quantize = logged("q8_0", real_quantize)
# both processes wait for the same moment, then race
while not (cache / "go").exists():
    time.sleep(0.01)
print(precision.model_for("q8_0", Path(sys.argv[3]), cache))
"""


def test_two_processes_racing_build_each_variant_once(tmp_path: Path) -> None:
    cache, log, script = tmp_path / "cache", tmp_path / "builds.log", tmp_path / "racer.py"
    cache.mkdir()
    script.write_text(textwrap.dedent(RACER))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache), str(log), str(shipped_model_path())],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    (cache / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    (path,) = paths
    # each build ran once, and never overlapped with another build of the same file
    assert log.read_text().splitlines() == ["f16 start", "f16 end", "q8_0 start", "q8_0 end"]
    folder = Path(path).parent
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    reader = gguf.GGUFReader(path)
    assert int(reader.get_field("general.file_type").contents()) == 7  # LLAMA_FTYPE_MOSTLY_Q8_0


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "m.F16.gguf"

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half a model")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        precision._atomic_build(target, broken)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.F16.gguf.lock"]
    # the next try builds it
    precision._atomic_build(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole"


def test_f16_keeps_the_metadata_and_dequantizes_every_tensor() -> None:
    source = shipped_model_path()
    f16 = precision.model_for("f16", source)  # the user cache: built once per machine
    src, out = gguf.GGUFReader(source), gguf.GGUFReader(f16)
    skip = {"general.file_type", "GGUF.kv_count", "GGUF.tensor_count", "GGUF.version"}
    src_fields = {k: f.contents() for k, f in src.fields.items() if k not in skip}
    out_fields = {k: f.contents() for k, f in out.fields.items() if k not in skip}
    assert out_fields == src_fields  # tokenizer, chat template, hyperparameters
    assert int(out.get_field("general.file_type").contents()) == 1
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for s, o in zip(src.tensors, out.tensors, strict=True):
        assert list(o.shape) == list(s.shape), s.name
        assert o.tensor_type.name == ("F32" if len(s.shape) == 1 else "F16"), s.name
    checked = {"token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"}
    for s, o in zip(src.tensors, out.tensors, strict=True):
        if s.name in checked:
            expected = gguf.quants.dequantize(s.data, s.tensor_type)
            np.testing.assert_allclose(
                np.asarray(o.data, np.float32), expected, rtol=1e-3, atol=1e-4
            )
            checked.remove(s.name)
    assert not checked
    # a second call reuses the file
    mtime = f16.stat().st_mtime_ns
    assert precision.model_for("f16", source) == f16
    assert f16.stat().st_mtime_ns == mtime


def test_unknown_precision_and_the_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EngineError, match=r"unknown precision 'fp4'.*available: q4_1, f16"):
        precision.model_for("fp4", shipped_model_path())
    assert precision.model_for("q4_1", shipped_model_path()) == shipped_model_path()
    monkeypatch.setenv(precision.ENV_CACHE, "/some/where")
    assert precision.cache_dir() == Path("/some/where")
    monkeypatch.delenv(precision.ENV_CACHE)
    assert "pytest-tokperf" in str(precision.cache_dir())


@pytest.fixture(scope="module")
def f16_engine() -> LlamaCppEngine:
    e = load_engine("llamacpp", {"precision": "f16", "n_threads": 2})
    assert isinstance(e, LlamaCppEngine)
    yield e
    asyncio.run(e.aclose())


def test_the_f16_engine_names_its_precision_and_answers(f16_engine: LlamaCppEngine) -> None:
    info = f16_engine.info
    assert (info.model, info.precision) == ("SmolLM2-135M-Instruct", "f16")
    assert Path(info.settings["model_path"]).name == "SmolLM2-135M-Instruct.F16.gguf"
    assert info.settings["decoding"] == "greedy"
    assert info.settings["chat_template"].startswith("gguf tokenizer.chat_template sha256:")

    async def collect() -> str:
        req = Request("q", "What is the capital of France? Answer in one sentence.", 16)
        return "".join([c.text async for c in f16_engine.stream(req)])

    assert "Paris" in asyncio.run(collect())


def test_logits_match_llama_cpp_logits_all(f16_engine: LlamaCppEngine) -> None:
    prompt = "Name a colour."
    continuation = [504, 3575, 282, 4649]  # any tokens: teacher forcing scores what it is given
    rows = f16_engine.logits(prompt, continuation)
    assert isinstance(f16_engine, LogitsEngine)
    llm = llama_cpp.Llama(
        model_path=f16_engine.info.settings["model_path"],
        n_ctx=256,
        logits_all=True,
        verbose=False,
    )
    tokens = f16_engine.prompt_tokens(prompt)
    assert rows.shape == (4, llm.n_vocab())  # the logits crossed the child's pipe whole
    llm.eval(tokens + continuation[:-1])
    expected = llm.scores[len(tokens) - 1 : len(tokens) + len(continuation) - 1]
    llm.close()
    # batched and one-token-at-a-time decoding round differently in the last bits
    np.testing.assert_allclose(rows, expected, atol=0.2)
    assert (rows.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert f16_engine.logits(prompt, []).shape == (0, rows.shape[1])


def test_other_engines_do_not_claim_logits() -> None:
    class Streaming:
        info = None

        def stream(self, request: Request) -> None: ...

    assert not isinstance(Streaming(), LogitsEngine)
