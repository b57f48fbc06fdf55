"""The embedded engine on the real SmolLM2-135M model (llama.cpp, CPU)."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

import pytest

from pytest_tokperf.driver import run
from pytest_tokperf.engines import EngineError, MissingExtraError, Request, load_engine
from pytest_tokperf.engines.llamacpp import LlamaCppEngine, shipped_model_path

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    e = load_engine("llamacpp", {"n_threads": 2})
    assert isinstance(e, LlamaCppEngine)
    yield e
    asyncio.run(e.aclose())


async def _collect(engine: LlamaCppEngine, request: Request):
    return [c async for c in engine.stream(request)]


def test_engine_info_describes_the_shipped_model(engine: LlamaCppEngine) -> None:
    info = engine.info
    assert (info.backend, info.model, info.precision, info.devices) == (
        "llamacpp",
        "SmolLM2-135M-Instruct",
        "q4_1",
        1,
    )
    assert info.versions["llama-cpp-python"] == llama_cpp.__version__
    assert info.settings["model_path"] == str(shipped_model_path())


def test_chunks_count_tokens_and_decode_to_the_text(engine: LlamaCppEngine) -> None:
    chunks = asyncio.run(_collect(engine, Request("a", "Name three colours.", 12)))
    ids = [t for c in chunks for t in c.token_ids]
    assert 0 < len(chunks) <= 12
    assert sum(c.tokens for c in chunks) == len(ids)
    assert all(c.tokens == 1 for c in chunks[:-1])  # the last may carry only a cut character
    text = "".join(c.text for c in chunks)
    # an independent decode of all ids at once gives the same text
    llm = llama_cpp.Llama(model_path=str(shipped_model_path()), n_ctx=512, verbose=False)
    assert llm.detokenize(ids).decode("utf-8", "replace") == text
    llm.close()


def test_greedy_output_is_deterministic_whatever_ran_before(engine: LlamaCppEngine) -> None:
    req = Request("q", "What is the capital of France? Answer in one sentence.", 24)
    first = asyncio.run(_collect(engine, req))
    asyncio.run(_collect(engine, Request("other", "Write a haiku about rain.", 24)))
    again = asyncio.run(_collect(engine, req))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert "Paris" in "".join(c.text for c in first)


def test_concurrent_requests_are_serialised_and_match_sequential(engine: LlamaCppEngine) -> None:
    reqs = [Request(f"r{i}", p, 16) for i, p in enumerate(["Say hi.", "Count to five.", "2+2?"])]
    alone = [asyncio.run(_collect(engine, r)) for r in reqs]
    together = run(engine, reqs)  # issued at once; the engine runs them one at a time
    assert [r.text for r in together] == ["".join(c.text for c in a) for a in alone]
    # one at a time: each request's first token comes after the previous one finished
    for earlier, later in itertools.pairwise(together):
        assert later.chunk_ns[0] > earlier.chunk_ns[-1]


def test_max_tokens_is_respected_exactly(engine: LlamaCppEngine) -> None:
    (rec,) = run(engine, [Request("long", "Write a long story about a dragon.", 5)])
    assert rec.ok and rec.output_tokens == 5


def test_a_too_long_prompt_is_a_failed_record(engine: LlamaCppEngine) -> None:
    (rec,) = run(engine, [Request("huge", "word " * 3000, 8)])
    assert rec.error is not None and "exceeds the context window of 2048 tokens" in rec.error


def test_a_timed_out_run_leaves_the_engine_usable(engine: LlamaCppEngine) -> None:
    recs = run(
        engine, [Request(f"s{i}", "Write a long story.", 500) for i in range(3)], timeout_s=0.5
    )
    assert all(r.error is not None and "time limit" in r.error for r in recs)
    (after,) = run(engine, [Request("after", "Say hi.", 4)])
    assert after.ok and after.output_tokens > 0


def test_bad_settings_and_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unknown llamacpp engine settings n_thread; allowed"):
        load_engine("llamacpp", {"n_thread": 2})
    with pytest.raises(EngineError, match="does not exist"):
        load_engine("llamacpp", {"model_path": str(tmp_path / "missing.gguf")})
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(EngineError, match=r"llama\.cpp could not load"):
        load_engine("llamacpp", {"model_path": str(junk)})
    with pytest.raises(EngineError, match="unknown engine backend 'vllm'; available: llamacpp"):
        load_engine("vllm", {})


def test_a_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what "not installed" looks like
    with pytest.raises(MissingExtraError, match=r"pip install 'pytest-tokperf\[embedded\]'"):
        load_engine("llamacpp", {})
