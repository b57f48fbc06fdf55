"""The openai engine against real loopback servers: a misbehaving one for every error
path, and a real llama.cpp server running the embedded model for agreement."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_tokperf import driver, launcher
from pytest_tokperf.engines import EngineError, Request, load_engine
from pytest_tokperf.engines.openai import OpenAIEngine

pytest.importorskip("aiohttp", reason="needs the 'openai' extra")
FAKE = Path(__file__).with_name("fake_openai_server.py")
FAST = {"first_token_timeout_s": 2, "idle_timeout_s": 1, "total_timeout_s": 20}


@pytest.fixture(scope="module")
def fake() -> Iterator[launcher.Server]:
    server = launcher.start(f"{sys.executable} {FAKE} --port {{port}}", ready_timeout_s=60)
    yield server
    server.stop()


def _run(engine: OpenAIEngine, prompts: list[str], timeout_s: float = 60.0):
    loop = driver.new_loop()
    try:
        reqs = [Request(p, p, 8) for p in prompts]
        return {r.id: r for r in driver.run(engine, reqs, loop=loop, timeout_s=timeout_s)}
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()


def _engine(server: launcher.Server, **settings: object) -> OpenAIEngine:
    engine = load_engine("openai", {"base_url": server.base_url, **FAST, **settings})
    assert isinstance(engine, OpenAIEngine)
    return engine


def test_every_error_path_is_a_failed_record_and_the_run_ends_on_time(
    fake: launcher.Server,
) -> None:
    prompts = ["ok", "multi", "http500", "cut", "badjson", "stall", "nodone", "error_event"]
    prompts.append("slowfirst")
    start = time.monotonic()
    recs = _run(_engine(fake), prompts)
    # idle 1 s, first token 2 s: a generous bound that still proves nothing waited 30 s
    assert time.monotonic() - start < 15
    assert recs["ok"].ok and recs["ok"].output_tokens == 3 and recs["ok"].text == "one two three"
    # the server's usage is the truth when it sends several tokens per event
    assert recs["multi"].ok and recs["multi"].output_tokens == 5
    # ... spread over the reads that carried tokens: none negative, none added after them
    multi = recs["multi"]
    assert all(n > 0 for n in multi.chunk_tokens) and len(multi.chunk_tokens) <= 3
    assert multi.issue_ns < multi.chunk_ns[0] and multi.chunk_ns[-1] <= multi.end_ns
    expected = {
        "http500": "HTTP 500 from http://127.0.0.1:",
        "cut": "",  # aiohttp's own words for a closed connection, whatever they are
        "badjson": "bad JSON in a stream event: b'{not json'",
        "stall": "no data for the idle timeout of 1 s",
        "nodone": "the stream ended before its final 'data: [DONE]'",
        "error_event": "the server reported an error mid-stream",
        "slowfirst": "no data within the first-token timeout of 2 s",
    }
    for prompt, says in expected.items():
        error = recs[prompt].error
        assert error is not None and says in error, (prompt, error)
    assert "boom: the engine is on fire" in (recs["http500"].error or "")
    assert recs["cut"].output_tokens == 2  # what arrived before the cut is kept
    assert recs["stall"].output_tokens == 2


def test_token_timing_is_exact_and_counts_never_negative(fake: launcher.Server) -> None:
    recs = _run(_engine(fake), ["role", "fewer"])
    role, fewer = recs["role"], recs["fewer"]
    # the role-only delta came at once; the first token 0.3 s later is the first chunk
    assert role.ok and role.output_tokens == 3 and role.text == "one two three"
    assert role.chunk_ns[0] - role.issue_ns >= 300_000_000
    # 4 text events, usage 3: three tokens where text arrived, none negative, and no
    # chunk for the usage event 0.3 s later (no spurious inter-token gap)
    assert fewer.ok and fewer.output_tokens == 3 and fewer.text == "one two three"
    assert all(n > 0 for n in fewer.chunk_tokens)
    assert fewer.end_ns - fewer.chunk_ns[-1] >= 300_000_000


def test_the_first_token_clock_starts_when_the_request_is_sent(fake: launcher.Server) -> None:
    # one connection: the second request waits 1.5 s for it, then 1.5 s for its first
    # token; 3 s from issue, but only 1.5 s from being sent, under the 2 s timeout
    recs = _run(_engine(fake, max_connections=1), ["slow1.5", "slow1.5 "])
    assert all(r.ok for r in recs.values()), [r.error for r in recs.values()]
    assert max(r.chunk_ns[0] - r.issue_ns for r in recs.values()) > 2_900_000_000


def test_completions_api_reads_text(fake: launcher.Server) -> None:
    recs = _run(_engine(fake, api="completions"), ["ok"])
    assert recs["ok"].ok and recs["ok"].text == "one two three"


def test_usage_or_a_tokenizer_is_required_and_they_must_agree(fake: launcher.Server) -> None:
    from pytest_tokperf.engines.llamacpp import shipped_model_path

    pytest.importorskip("llama_cpp")
    (rec,) = _run(_engine(fake), ["nousage"]).values()
    assert rec.error is not None and "no usage" in rec.error and "'tokenizer'" in rec.error
    tokenizer = str(shipped_model_path())
    recs = _run(_engine(fake, tokenizer=tokenizer), ["nousage", "mismatch", "ok"])
    assert recs["nousage"].ok and recs["nousage"].output_tokens == 3  # "one two three"
    assert "usage says 3 output tokens but the tokenizer counts" in (recs["mismatch"].error or "")
    assert recs["ok"].ok


def test_a_refused_connection_is_a_failed_record() -> None:
    server = launcher.start(f"{sys.executable} {FAKE} --port {{port}}", ready_timeout_s=60)
    engine = _engine(server)
    server.stop()
    (rec,) = _run(engine, ["ok"]).values()
    assert rec.error is not None and "cannot connect to 127.0.0.1:" in rec.error


def test_the_api_key_is_sent_but_never_recorded(
    fake: launcher.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKPERF_TEST_KEY", "sk-very-secret")
    engine = _engine(fake, api_key_env="TOKPERF_TEST_KEY")
    assert "sk-very-secret" not in json.dumps(dict(engine.info.settings))
    assert engine.info.settings["api_key_env"] == "TOKPERF_TEST_KEY"
    _run(engine, ["ok"])
    with urllib.request.urlopen(fake.base_url + "/seen") as response:
        assert json.loads(response.read())["authorization"] == "Bearer sk-very-secret"


def test_load_errors_are_clear(fake: launcher.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EngineError, match="needs base_url"):
        load_engine("openai", {})
    with pytest.raises(EngineError, match=r"model 'llama' is not served at .*; served: fake"):
        load_engine("openai", {"base_url": fake.base_url, "model": "llama"})
    with pytest.raises(EngineError, match="cannot list models"):
        load_engine("openai", {"base_url": "http://127.0.0.1:9"})
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(EngineError, match="'NO_SUCH_KEY_VAR', but that variable is not set"):
        load_engine("openai", {"base_url": fake.base_url, "api_key_env": "NO_SUCH_KEY_VAR"})
    with pytest.raises(EngineError, match="unknown openai engine settings url"):
        load_engine("openai", {"url": fake.base_url})


def test_launcher_reports_a_server_that_dies_or_never_answers(tmp_path: Path) -> None:
    with pytest.raises(launcher.LaunchError, match="exited with code 3") as info:
        launcher.start(f"{sys.executable} -c \"print('no model here'); raise SystemExit(3)\"")
    assert "no model here" in str(info.value)
    sleeper = f'{sys.executable} -c "import time; time.sleep(60)"'
    start = time.monotonic()
    with pytest.raises(launcher.LaunchError, match=r"did not answer .* within 1 s"):
        launcher.start(sleeper, base_url="http://127.0.0.1:9", ready_timeout_s=1)
    assert time.monotonic() - start < 30
    with pytest.raises(launcher.LaunchError, match="cannot run server command"):
        launcher.start("/no/such/binary --port {port}")


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for a reaper this sandbox may lack)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    # the server spawns a worker of its own; stopping the server must stop that too
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, runpy; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); "
        "sys.argv = ['x', '--port', sys.argv[1]]; "
        f"runpy.run_path({str(FAKE)!r}, run_name='__main__')"
    )
    server = launcher.start(f'{sys.executable} -c "{script}" {{port}}', ready_timeout_s=60)
    child = int(pid_file.read_text())
    assert _alive(child)
    start = time.monotonic()
    server.stop()
    assert server.process.poll() is not None
    # the server exits at SIGTERM: it is not waited for until the grace period's SIGKILL
    assert time.monotonic() - start < launcher.GUARD_GRACE_S / 2
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_a_tokenizer_json_counts_when_the_server_sends_no_usage(
    fake: launcher.Server, tmp_path: Path
) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="needs the 'openai' extra")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "one": 1, "two": 2, "three": 3}
    hf = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    engine = _engine(fake, tokenizer=str(path))
    assert (
        engine.info.settings["token_counting"]
        == "usage; without usage: Hugging Face tokenizer tokenizer.json, after the run"
    )
    loop = driver.new_loop()
    try:
        plan = driver.Plan("offline", texts=False)  # a perf run: the text is read only to count
        driven = driver.run_plan(engine, [Request("nousage", "nousage", 8)], plan, loop=loop)
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()
    (rec,) = driven.records
    assert rec.ok and rec.output_tokens == 3 and rec.text == ""
    assert driven.token_counting == {"Hugging Face tokenizer tokenizer.json": 1}


def test_without_usage_or_a_way_to_count_the_request_fails_saying_how(
    fake: launcher.Server,
) -> None:
    (rec,) = _run(_engine(fake), ["nousage"]).values()
    assert rec.error is not None and "no tokenize endpoint" in rec.error
    assert "--tokperf-tokenizer" in rec.error


def test_the_generic_stream_yields_the_settled_counts(fake: launcher.Server) -> None:
    engine = _engine(fake)
    loop = driver.new_loop()

    async def chunks() -> list[tuple[int, str]]:
        return [(c.tokens, c.text) async for c in engine.stream(Request("multi", "multi", 8))]

    try:
        got = loop.run_until_complete(chunks())
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()
    assert sum(n for n, _ in got) == 5 and all(n > 0 for n, _ in got)
    assert "".join(t for _, t in got) == "one two three"


def test_the_standard_event_loop_works_too(fake: launcher.Server) -> None:
    import asyncio

    engine = _engine(fake)
    loop = asyncio.new_event_loop()
    try:
        (rec,) = driver.run(engine, [Request("ok", "ok", 8)], loop=loop)
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()
    assert rec.ok and rec.output_tokens == 3 and rec.text == "one two three"


def test_a_perf_run_settles_from_the_tail_as_a_full_read_does(fake: launcher.Server) -> None:
    # texts=False (a perf run) reads usage and what follows the last token from the raw
    # tail; texts=True reads every event: the same tokens and errors either way (how
    # the writes fall into reads is the machine's, so reads are not compared)
    prompts = ["ok", "multi", "role", "fewer", "badjson", "nodone", "error_event", "http500"]
    engine = _engine(fake)
    loop = driver.new_loop()
    try:
        reqs = [Request(p, p, 8) for p in prompts]
        full = {r.id: r for r in driver.run(engine, reqs, loop=loop, timeout_s=60)}
        perf = {r.id: r for r in driver.run(engine, reqs, loop=loop, timeout_s=60, texts=False)}
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()
    for p in prompts:
        assert perf[p].error == full[p].error, p
        assert perf[p].output_tokens == full[p].output_tokens, p
        assert all(n > 0 for n in perf[p].chunk_tokens), p
        assert perf[p].text == "" and (full[p].text != "" or not full[p].ok)
    assert perf["multi"].output_tokens == 5 and perf["fewer"].output_tokens == 3


def test_a_timed_out_request_is_not_sent_again(fake: launcher.Server) -> None:
    # a request on a kept-alive connection that times out before any answer is failed,
    # not retried (a retry is only for a connection the server closed while it was idle):
    # the server sees it once (a retry would also have doubled the timeout)
    recs = _run(_engine(fake, max_connections=1), ["ok", "slowfirst once"])
    assert recs["ok"].ok
    assert "first-token timeout of 2 s" in (recs["slowfirst once"].error or "")
    with urllib.request.urlopen(fake.base_url + "/seen") as response:
        assert json.loads(response.read())["sent slowfirst once"] == 1


def test_without_usage_the_served_models_own_gguf_counts() -> None:
    # a server listing its model's path (vLLM's `root`): the GGUF there counts, before
    # the server's tokenize endpoint (this one has none), and the result says which
    from pytest_tokperf.engines.llamacpp import shipped_model_path

    gguf = shipped_model_path()
    cmd = f"{sys.executable} {FAKE} --port {{port}} --root {gguf}"
    server = launcher.start(cmd, ready_timeout_s=60)
    try:
        engine = _engine(server)
        by = f"GGUF tokenizer {gguf.name} (the served model's)"
        counting = engine.info.settings["token_counting"]
        assert counting == f"usage; without usage: {by}, after the run"
        loop = driver.new_loop()
        try:
            plan = driver.Plan("offline", texts=False)
            driven = driver.run_plan(engine, [Request("nousage", "nousage", 8)], plan, loop=loop)
        finally:
            loop.run_until_complete(engine.aclose())
            loop.close()
    finally:
        server.stop()
    (rec,) = driven.records
    assert rec.ok and rec.output_tokens == 3  # "one two three" in SmolLM2's vocabulary
    assert dict(driven.token_counting) == {by: 1}


def test_the_served_models_tokenizer_is_found_by_path_or_in_the_hub_cache(
    tmp_path: Path,
) -> None:
    from pytest_tokperf.engines.openai import find_tokenizer

    hub = tmp_path / "hub"
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    snapshots = hub / "models--org--name" / "snapshots"
    for rev in ("aaa", "bbb"):
        (snapshots / rev).mkdir(parents=True)
        (snapshots / rev / "tokenizer.json").write_text("{}")
    (hub / "models--org--name" / "refs").mkdir()
    (hub / "models--org--name" / "refs" / "main").write_text("bbb\n")
    assert find_tokenizer([None, str(gguf)], hub) == str(gguf)
    assert find_tokenizer([str(folder)], hub) == str(folder / "tokenizer.json")
    assert find_tokenizer(["alias", "org/name"], hub) == str(snapshots / "bbb" / "tokenizer.json")
    (hub / "models--org--name" / "refs" / "main").unlink()
    assert find_tokenizer(["org/name"], hub) == str(snapshots / "aaa" / "tokenizer.json")
    # an alias, a relative path (the server's cwd is not ours), a file of another kind
    (tmp_path / "notes.txt").write_text("")
    assert find_tokenizer(["smollm2", "model", str(tmp_path / "notes.txt")], hub) is None
